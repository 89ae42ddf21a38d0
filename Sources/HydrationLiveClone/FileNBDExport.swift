import HydrationEngine
import HydrationStorage
import NBDServer
import NIOCore

/// An export over one open file or block device of the storage layer (`PosixStorage`, or a
/// simulated disk in tests). Every call runs on the `IOExecutor`, never on the cooperative pool.
///
/// - TRIM gives the space back (`release`: PUNCH_HOLE on a file, BLKDISCARD on a device); failures
///   of this hint are ignored.
/// - WRITE_ZEROES punches (`zeroOut`) unless NO_HOLE, which writes zeros; FAST_ZERO with NO_HOLE
///   is refused with ENOTSUP (writing zeros is no faster than a write).
/// - `base:allocation` comes from SEEK_DATA/SEEK_HOLE (`nextData`): holes read as zeros.
/// - FLUSH and FUA are `fdatasync`; one descriptor serves every connection, so multi-conn is safe.
public final class FileNBDExport: NBDExport {
    public let name: String
    public let size: UInt64
    public let description: String?
    public let capabilities: NBDExportCapabilities
    public let blockSize: NBDBlockSize
    private let device: any StorageDevice
    private let io: IOExecutor

    /// Extents reported per block status request at most (later ones need another request).
    static let maxExtentsPerReply = 1024
    /// Zeros written per pwrite for NO_HOLE.
    static let zeroChunk = 1 << 20

    /// `size`: the bytes served, at most the device's (a clone is as large as its source even on
    /// a larger destination); the device's size by default.
    public init(
        name: String, device: any StorageDevice, io: IOExecutor, description: String? = nil, readOnly: Bool = false,
        size: UInt64? = nil
    ) {
        self.name = name
        self.device = device
        self.io = io
        self.size = min(size ?? device.info.size, device.info.size)
        self.description = description
        var caps: NBDExportCapabilities = [.flush, .fua, .trim, .writeZeroes, .fastZero, .cache, .multiConn]
        if readOnly { caps.insert(.readOnly) }
        self.capabilities = caps
        let lbs = UInt32(max(1, device.info.logicalBlockSize))
        // A regular file takes any byte range; a block device only whole logical blocks.
        let minimum: UInt32 = device.info.identity.kind == .blockDevice ? lbs : 1
        self.blockSize = NBDBlockSize(
            minimum: minimum, preferred: max(4096, minimum), maximum: NBDProtocol.defaultMaxPayload)
    }

    private func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws(NBDError) -> T {
        try await io.runForNBD(body)
    }

    public func read(offset: UInt64, length: UInt32) async throws(NBDError) -> ByteBuffer {
        let device = self.device
        return try await run {
            let n = Int(length)
            var buffer = ByteBufferAllocator().buffer(capacity: n)
            try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { raw in
                try device.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[..<n]), at: offset)
                return n
            }
            return buffer
        }
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool) async throws(NBDError) {
        let device = self.device
        try await run {
            try data.withUnsafeReadableBytes { raw in try device.write(raw, at: offset) }
            if fua { try device.sync() }
        }
    }

    public func flush() async throws(NBDError) {
        let device = self.device
        try await run { try device.sync() }
    }

    public func trim(offset: UInt64, length: UInt32, fua: Bool) async throws(NBDError) {
        let device = self.device
        try await run {
            do {
                try device.release(offset: offset, length: UInt64(length))
            } catch let e as StorageError where e.isUnsupported {
                return  // a hint the device cannot take
            }
            if fua { try device.sync() }
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool)
        async throws(NBDError)
    {
        if noHole && fastZero { throw NBDError(.ENOTSUP, "zeroing without a hole means writing zeros") }
        let device = self.device
        try await run {
            if noHole {
                let zeros = [UInt8](repeating: 0, count: min(Self.zeroChunk, Int(length)))
                var done: UInt64 = 0
                while done < UInt64(length) {
                    let n = min(UInt64(zeros.count), UInt64(length) - done)
                    try zeros.withUnsafeBytes { raw in
                        try device.write(UnsafeRawBufferPointer(rebasing: raw[..<Int(n)]), at: offset + done)
                    }
                    done += n
                }
            } else {
                try device.zeroOut(offset: offset, length: UInt64(length))
            }
            if fua { try device.sync() }
        }
    }

    public func cache(offset: UInt64, length: UInt32) async throws(NBDError) {}

    public func blockStatus(context: String, offset: UInt64, length: UInt32) async throws(NBDError) -> [NBDExtent] {
        guard context == NBDProtocol.baseAllocation else { throw NBDError.invalid("unknown context \(context)") }
        let device = self.device
        let size = self.size
        return try await run {
            let end = min(size, offset + UInt64(length))
            var extents: [NBDExtent] = []
            var pos = offset
            while pos < end && extents.count < Self.maxExtentsPerReply {
                let data = try device.nextData(from: pos)
                let dataStart = min(data?.lowerBound ?? end, end)
                if dataStart > pos {
                    extents.append(
                        NBDExtent(length: UInt32(dataStart - pos), flags: NBDProtocol.stateHole | NBDProtocol.stateZero)
                    )
                    pos = dataStart
                }
                if let data, pos < end {
                    let dataEnd = min(data.upperBound, end)
                    extents.append(NBDExtent(length: UInt32(dataEnd - pos), flags: 0))
                    pos = dataEnd
                }
            }
            return extents
        }
    }
}
