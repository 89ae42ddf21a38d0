import Foundation
import Testing

@testable import HydrationEngine
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// The copier's I/O buffers (issue 13, round 5): aligned to their capacity inside 2 MiB-aligned
/// mappings advised for transparent huge pages, so that a direct request of up to 1 MiB is one
/// physically contiguous segment (docs/benchmarks.md, "Round 5").
@Suite struct IOBufferPoolTests {
    @Test func capacitiesArePowersOfTwoFromOneMiB() {
        #expect(IOBufferPool.capacity(for: 1) == 1 << 20)
        #expect(IOBufferPool.capacity(for: 65536) == 1 << 20)
        #expect(IOBufferPool.capacity(for: 1 << 20) == 1 << 20)
        #expect(IOBufferPool.capacity(for: (1 << 20) + 1) == 2 << 20)
        #expect(IOBufferPool.capacity(for: 3 << 20) == 4 << 20)
    }

    @Test func buffersAreAlignedAndNeverCrossAHugePage() throws {
        let pool = IOBufferPool(keep: 4)
        var taken: [UnsafeMutableRawBufferPointer] = []
        for count in [4096, 1 << 20, 200_000, 3 << 20, 1 << 20] {
            let b = pool.take(count)
            taken.append(b)
            let address = UInt(bitPattern: try #require(b.baseAddress))
            #expect(b.count >= count)
            #expect(pool.isMapped(b), "not from a huge-page mapping: \(b)")
            // Aligned to its capacity (at most 2 MiB), so a buffer of 1 MiB lies inside one huge page.
            #expect(
                address % UInt(min(b.count, IOBufferPool.hugePage)) == 0, "\(String(address, radix: 16)) for \(b.count)"
            )
            if b.count <= IOBufferPool.hugePage {
                #expect(
                    address / UInt(IOBufferPool.hugePage) == (address + UInt(b.count) - 1) / UInt(IOBufferPool.hugePage)
                )
            }
            // Usable end to end.
            b.initializeMemory(as: UInt8.self, repeating: 0x5A)
        }
        // The first buffer came from a 2 MiB mapping; its other half was handed out next.
        let first = UInt(bitPattern: taken[0].baseAddress!), second = UInt(bitPattern: taken[1].baseAddress!)
        #expect(first ^ second == 1 << 20, "\(String(first, radix: 16)) \(String(second, radix: 16))")
        for b in taken { pool.give(b) }
    }

    /// The mapping is eligible for transparent huge pages (MADV_HUGEPAGE: in the kernel's
    /// "madvise" mode, the default of many distributions and of this machine, no huge page is
    /// given without it). Skipped where THP is off.
    @Test func mappingIsAdvisedForHugePages() throws {
        let mode = (try? String(contentsOfFile: "/sys/kernel/mm/transparent_hugepage/enabled", encoding: .utf8)) ?? ""
        try #require(!mode.isEmpty && !mode.contains("[never]"), "transparent huge pages are off here (\(mode))")
        let pool = IOBufferPool(keep: 2)
        let b = pool.take(1 << 20)
        defer { pool.give(b) }
        b.initializeMemory(as: UInt8.self, repeating: 1)
        let address = UInt(bitPattern: b.baseAddress!)
        // Read in full (Foundation's String(contentsOfFile:) stops after the first 4 KiB of a
        // /proc file, whose size reads as 0), with the topology's reader of /proc.
        let smaps = DeviceTopology().read("/proc/self/smaps", limit: 1 << 26) ?? ""
        var inside = false
        var eligible: String?
        for line in smaps.split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), line.first?.isHexDigit == true,
                let space = line.firstIndex(of: " "), dash < space,
                let lo = UInt(line[..<dash], radix: 16), let hi = UInt(line[line.index(after: dash)..<space], radix: 16)
            {
                inside = lo <= address && address < hi
                continue
            }
            if inside, line.hasPrefix("THPeligible:") {
                eligible = line.split(separator: " ", omittingEmptySubsequences: true).last.map(String.init)
            }
        }
        #expect(eligible == "1", "THPeligible of the buffer's mapping: \(eligible ?? "not found")")
    }

    /// What is kept free is bounded in bytes as well as in count, and `drain` (the end of a
    /// copier's run) releases all of it: the round-5 attack measured 10 MiB of RSS kept per
    /// finished job, and 816 MiB with 64 MiB regions.
    @Test func keptBuffersAreBoundedAndDrained() {
        let pool = IOBufferPool(keep: 16, keepBytes: 4 << 20)
        let big = (0..<3).map { _ in pool.take(2 << 20) }
        for b in big { #expect(b.count == 2 << 20 && pool.isMapped(b)) }
        for b in big { pool.give(b) }
        #expect(pool.keptBytes == 4 << 20)
        #expect(!pool.isMapped(big[2]), "the third 2 MiB buffer was kept beyond 4 MiB")
        let huge = pool.take(64 << 20)
        pool.give(huge)
        #expect(pool.keptBytes == 4 << 20 && !pool.isMapped(huge))
        pool.drain()
        #expect(pool.keptBytes == 0)
        #expect(!pool.isMapped(big[0]) && !pool.isMapped(big[1]))
        // Still usable.
        let again = pool.take(1 << 20)
        again.initializeMemory(as: UInt8.self, repeating: 3)
        pool.give(again)
    }

    /// A buffer the pool did not map (a test's, below) is deallocated, not unmapped, and a mapped
    /// one beyond `keep` is unmapped; the pool keeps working after both.
    @Test func foreignAndSurplusBuffersAreReleasedTheirOwnWay() {
        let pool = IOBufferPool(keep: 1)
        let foreign = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        #expect(!pool.isMapped(foreign))
        pool.give(foreign)  // kept
        let a = pool.take(1 << 20)  // the foreign one back
        #expect(a.baseAddress == foreign.baseAddress)
        let b = pool.take(1 << 20)  // a new mapping; its other half is kept
        #expect(pool.isMapped(b))
        pool.give(a)  // pool full: deallocated
        pool.give(b)  // pool full: unmapped
        let c = pool.take(1 << 20)
        c.initializeMemory(as: UInt8.self, repeating: 7)
        #expect(c.load(fromByteOffset: (1 << 20) - 1, as: UInt8.self) == 7)
        pool.give(c)
    }
}
