import HydrationEngine
import HydrationStorage
import Logging
import NBDServer
import NIOCore

/// BLOCK_STATUS: `base:allocation` from whichever side serves each region, and
/// `x-hydrationd:state` per region.
extension LiveCloneExport {
    /// Appends an extent, merged into the last one when the flags agree.
    static func append(_ extents: inout [NBDExtent], _ length: UInt64, _ flags: UInt32) {
        if let last = extents.last, last.flags == flags, UInt64(last.length) + length <= UInt64(UInt32.max) {
            extents[extents.count - 1].length += UInt32(length)
        } else {
            extents.append(NBDExtent(length: UInt32(length), flags: flags))
        }
    }

    public func blockStatus(context: String, offset: UInt64, length: UInt32) async throws(NBDError) -> [NBDExtent] {
        try enter()
        defer { leave() }
        let end = min(size, offset + UInt64(length))
        // At most 2 GiB per reply (extent lengths are 32-bit), at least one region.
        let capped = offset..<min(end, offset + max(geometry.regionSize, 1 << 31))
        let covered = regions(covering: capped)
        let (ownership, source, dest, geometry) = (self.ownership, self.source, self.dest, self.geometry)
        // On the export's I/O threads, not the cooperative pool: a flood of block status requests
        // (each up to `maxStateRegions` regions of work) then delays this export's own clients,
        // never another export's or the daemon's handshakes and control calls.
        switch context {
        case Self.stateContext:
            return try await run {
                // One bit array of at most `maxStateRegions` regions per call (the client asks
                // again from where the reply ends).
                let covered = covered.lowerBound..<min(covered.upperBound, covered.lowerBound + Self.maxStateRegions)
                let bits = ownership.stateBits(covered)
                var extents: [NBDExtent] = []
                var i = 0
                while i < bits.count {
                    var j = i + 1
                    while j < bits.count && bits[j] == bits[i] { j += 1 }
                    let r = geometry.byteRange(of: covered.lowerBound + i..<covered.lowerBound + j)
                    let lo = max(r.lowerBound, offset)
                    extents.append(NBDExtent(length: UInt32(r.upperBound - lo), flags: bits[i]))
                    i = j
                }
                return extents
            }
        case NBDProtocol.baseAllocation:
            return try await run(readsSource: !ownership.allHydrated(covered)) {
                var extents: [NBDExtent] = []
                // Pinned a window at a time: regions whose hydration alternates give a run each,
                // and only the first `maxExtents` extents are answered.
                var window = covered.lowerBound
                while window < covered.upperBound && extents.count < Self.maxExtents {
                    // The source runs stay pinned while SEEK_DATA looks at them.
                    try ownership.withSourcePins(window..<min(covered.upperBound, window + Self.maxStateRegions)) {
                        pins throws(StorageError) in
                        let runs = pins.runs
                        for run in runs where extents.count < Self.maxExtents {
                            let r = geometry.byteRange(of: run.regions)
                            var pos = max(r.lowerBound, capped.lowerBound)
                            let runEnd = min(r.upperBound, capped.upperBound)
                            while pos < runEnd && extents.count < Self.maxExtents {
                                let data = try run.fromSource ? source.nextData(from: pos) : dest.nextData(from: pos)
                                let dataStart = min(data?.lowerBound ?? runEnd, runEnd)
                                if dataStart > pos {
                                    Self.append(
                                        &extents, dataStart - pos, NBDProtocol.stateHole | NBDProtocol.stateZero)
                                    pos = dataStart
                                }
                                if let data, pos < runEnd {
                                    let dataEnd = min(data.upperBound, runEnd)
                                    Self.append(&extents, dataEnd - pos, 0)
                                    pos = dataEnd
                                }
                            }
                        }
                    }
                    window += Self.maxStateRegions
                }
                return extents
            }
        default:
            throw NBDError.invalid("unknown context \(context)")
        }
    }
}
