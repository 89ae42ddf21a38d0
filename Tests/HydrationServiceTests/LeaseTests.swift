import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// The write lease of a file source released as it is copied, on a real file: a later open
/// breaks it, and from then on no release reaches the file.
@Suite struct LeaseTests {
    @Test func anOpenBreaksTheLeaseAndStopsReleases() throws {
        let dir = TempDir("lease")
        let path = dir.file("src")
        try Data(repeating: 0xAB, count: 1 << 20).write(to: URL(fileURLWithPath: path))
        let dev = try PosixStorage().open(path, mode: .source(discard: true), directIO: false, why: "test")
        defer { dev.close() }
        try dev.holdWriteLease()
        #expect(!dev.leaseBroken)
        try dev.release(offset: 0, length: 64 << 10)  // allowed while the lease is intact
        let blocks = allocated(path)

        // A late opener (O_NONBLOCK: it fails with EWOULDBLOCK instead of waiting, and the
        // break is started all the same).
        let late = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        #expect(late < 0 && errno == EWOULDBLOCK, "the open must meet the lease")
        if late >= 0 { close(late) }
        #expect(dev.leaseBroken)
        #expect(throws: StorageError.self) { try dev.release(offset: 64 << 10, length: 64 << 10) }
        #expect(allocated(path) == blocks, "nothing released after the break")

        // Given up: the opener gets in; a new lease is refused while it has the file open.
        dev.giveUpLease()
        let reader = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        #expect(reader >= 0)
        #expect(throws: StorageError.self) { try dev.holdWriteLease() }
        #expect(throws: StorageError.self) { try dev.release(offset: 64 << 10, length: 64 << 10) }
        close(reader)
        // Once it is gone the lease is taken again and releases resume.
        try dev.holdWriteLease()
        try dev.release(offset: 64 << 10, length: 64 << 10)
        #expect(allocated(path) < blocks)
    }

    /// A device opened for direct I/O (a second, O_DIRECT, open of the file) cannot hold a lease:
    /// it says so instead of taking one its own descriptor would break.
    @Test func aDirectDeviceHoldsNoLease() throws {
        let dir = TempDir("lease-direct")
        let path = dir.file("src")
        try Data(repeating: 0xCD, count: 1 << 20).write(to: URL(fileURLWithPath: path))
        let dev = try PosixStorage().open(path, mode: .source(discard: true), directIO: true, why: "test")
        defer { dev.close() }
        guard dev.directIO.enabled else { return }  // tmpfs: no direct I/O here, nothing to check
        let e = #expect(throws: StorageError.self) { try dev.holdWriteLease() }
        #expect(e?.errno == EBUSY)
    }

    private func allocated(_ path: String) -> Int {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_blocks) : -1
    }
}
