import HydrationStorage
import Synchronization

/// The source as the copier and the live clone see it: they read it, and nothing else. Releasing
/// its space is the discarder's alone (`SourceReleaser`), and only for `CommittedRegions`.
package struct SourceReader: Sendable {
    private let device: any StorageDevice

    package init(_ device: any StorageDevice) { self.device = device }

    package var info: DeviceInfo { device.info }
    package var directIO: DirectIO { device.directIO }
    /// SEEK_DATA/SEEK_HOLE say where data is.
    package var reportsHoles: Bool { device.reportsHoles }
    /// A remote source's connection state (nil for a local one).
    package var availability: SourceAvailability? { device.availability }

    package func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try device.read(into: buffer, at: offset)
    }

    package func nextData(from offset: UInt64) throws(StorageError) -> Range<UInt64>? {
        try device.nextData(from: offset)
    }

    /// Drops the source's pages from the page cache (behind the copy front).
    package func dropCache(offset: UInt64, length: UInt64) {
        device.dropCache(offset: offset, length: length)
    }
}

/// The one way to give the source's space back: the discarder's. Made only by the job (its
/// initialiser is internal to the engine), handed only to the `Discarder`, which releases
/// nothing but `CommittedRegions`.
package struct SourceReleaser: Sendable {
    private let device: any StorageDevice

    init(_ device: any StorageDevice) { self.device = device }

    package var info: DeviceInfo { device.info }

    /// PUNCH_HOLE on a file, BLKDISCARD on a block device, TRIM on a remote export.
    package func release(offset: UInt64, length: UInt64) throws(StorageError) {
        try device.release(offset: offset, length: length)
    }

    /// Makes the releases so far durable (a punch is a change to the source like any other).
    package func sync() throws(StorageError) {
        try device.sync()
    }
}

/// Region sets the discarder has finished (released, or failed to release) and made durable,
/// counted in the order the committer published them: the committer drops them from the
/// pending-release list of its next commit. Written by the discarder only.
package final class ReleasesDone: Sendable {
    private let sets = Mutex(0)

    package init() {}

    /// Every published set up to `count` (1-based) is done.
    func record(upTo count: Int) { sets.withLock { $0 = max($0, count) } }

    /// How many published sets are done.
    package var count: Int { sets.withLock { $0 } }
}
