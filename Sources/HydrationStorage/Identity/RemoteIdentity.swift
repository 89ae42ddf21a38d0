/// The stable identity of a remote source: what the server says about the export, plus (recorded
/// at creation) a fingerprint of sampled 4 KiB blocks. The export name, size and description
/// alone do not tell two disks served under the same name apart; the samples do, and only samples
/// in regions that may not have been released are compared later.
package enum RemoteIdentity {
    package static let sampleCount = 8
    package static let sampleSize = 4096

    /// `nbd:export=…;size=…;desc=…` (the name and description hashed when long): what the server
    /// says about the export at the handshake.
    package static func baseID(exportName: String, size: UInt64, description: String?) -> String {
        let name =
            exportName.utf8.count <= 64 && !exportName.contains(";")
            ? exportName : "crc32c:" + hex32(CRC32C.checksum(Array(exportName.utf8)))
        let desc = description.map { hex32(CRC32C.checksum(Array($0.utf8))) } ?? "none"
        return "nbd:export=\(name);size=\(size);desc=\(desc)"
    }

    package static func hex32(_ v: UInt32) -> String {
        let s = String(v, radix: 16)
        return String(repeating: "0", count: 8 - s.count) + s
    }

    package struct Sample: Equatable, Sendable {
        package var offset: UInt64
        package var crc: UInt32
        package init(offset: UInt64, crc: UInt32) {
            self.offset = offset
            self.crc = crc
        }
    }

    /// Splits a recorded stable ID into its base and its samples.
    package static func parse(_ id: String) -> (base: String, samples: [Sample]) {
        let marker = Array(";fp=".utf8)
        let bytes = Array(id.utf8)
        guard bytes.count >= marker.count,
            let at = (0...(bytes.count - marker.count)).first(where: {
                bytes[$0..<$0 + marker.count].elementsEqual(marker)
            })
        else { return (id, []) }
        let base = String(decoding: bytes[..<at], as: UTF8.self)
        var samples: [Sample] = []
        for item in String(decoding: bytes[(at + marker.count)...], as: UTF8.self).split(separator: ",") {
            let parts = item.split(separator: ":")
            guard parts.count == 2, let block = UInt64(parts[0], radix: 16), let crc = UInt32(parts[1], radix: 16)
            else { continue }
            samples.append(Sample(offset: block * UInt64(sampleSize), crc: crc))
        }
        return (base, samples)
    }

    package static func format(base: String, samples: [Sample]) -> String {
        guard !samples.isEmpty else { return base }
        return base + ";fp="
            + samples.map { "\(String($0.offset / UInt64(sampleSize), radix: 16)):\(hex32($0.crc))" }.joined(
                separator: ",")
    }

    /// Where to sample: one block per eighth of the export, at the first data (BLOCK_STATUS) in
    /// that eighth when there is some, so that a sparse disk is not fingerprinted by its zeros.
    /// Only blocks `mayRead` allows are chosen. Blocking (reads the device).
    package static func chooseSamples(_ device: any StorageDevice, mayRead: (Range<UInt64>) -> Bool)
        throws(StorageError)
        -> [Sample]
    {
        let size = device.info.size
        let block = UInt64(sampleSize)
        guard size >= block else { return [] }
        var out: [Sample] = []
        for k in 0..<sampleCount {
            let lo = (size * UInt64(k) / UInt64(sampleCount)) / block * block
            let hi = size * UInt64(k + 1) / UInt64(sampleCount)
            var at = lo
            if let d = try device.nextData(from: lo), d.lowerBound < hi {
                at = d.lowerBound / block * block
            }
            if at + block > size { at = (size - block) / block * block }
            let range = at..<at + block
            guard mayRead(range), !out.contains(where: { $0.offset == at }) else { continue }
            out.append(Sample(offset: at, crc: try crc(device, at)))
        }
        return out
    }

    package static func crc(_ device: any StorageDevice, _ offset: UInt64) throws(StorageError) -> UInt32 {
        CRC32C.checksum(try device.read(count: sampleSize, at: offset))
    }
}

/// A remote source that confirms every new connection against the job's identity
/// (`HydrationRemote`'s libnbd device). A protocol so that the job arms it and asks why it gave
/// up without linking the NBD client.
package protocol RemoteSourceDevice: StorageDevice {
    /// What every new connection must find again from now on: the recorded fingerprint's
    /// samples that may still be read, plus witnesses of its own. Blocking.
    func armIdentity(recorded: [RemoteIdentity.Sample], mayRead: (Range<UInt64>) -> Bool) throws(StorageError)
    /// Why the source is not the job's any more (a reconnection found another disk), if so.
    var unconfirmedReason: String? { get }
}
