import ControlProtocol
import Foundation
import HydrationTestSupport
import Synchronization
import Testing

@testable import HydrationEngine
@testable import HydrationService
@testable import HydrationStorage

#if canImport(Glibc)
    import Glibc
#endif

/// Verified release (`verify`): a destination that acknowledges writes it does not keep (drops
/// them, corrupts one region, puts one at the wrong offset) costs the user their source without
/// verify, and with verify the job fails with DestinationMismatch before the region is committed
/// or released; once the device behaves, the job resumes and completes.
@Suite(.serialized) struct VerifiedReleaseTests {
    let io = IOExecutor(threads: 2)
    static let src = CrashScenario.sourcePath
    static let dst = CrashScenario.destPath
    static let meta = CrashScenario.metadataPath
    static let rs = 4096

    enum Lie: String, CaseIterable, Sendable { case dropEveryWrite, corruptOneRegion, misdirectOneRegion }

    struct Setup {
        let sc: CrashScenario
        let storage: CrashableStorage
        let job: HydrationJob
        /// The region the lie concerns (the first written to, for `dropEveryWrite`).
        let bad: Int
    }

    func setup(_ lie: Lie, verify: Bool) async throws -> Setup {
        let sc = CrashScenario.make(seed: 11)
        let storage = CrashableStorage()
        storage.addFile(Self.src, data: sc.image, holes: sc.holes)
        let t = Tunables(
            batchSize: 1, threshold: 1, rateLimitBytesPerSecond: nil, spaceBudgetBytes: 16 * 4096,
            commitIntervalMs: 3_600_000)
        var config = sc.config(t)
        config.verify = verify
        let job = try await HydrationJob.create(config, storage: storage, io: io, logger: crashLogger)
        func dataRegion(from: Int) -> Int {
            (from..<sc.image.count / Self.rs).first { r in
                sc.image[r * Self.rs..<(r + 1) * Self.rs].contains { $0 != 0 }
            }!
        }
        // Dropping every write: the first region that holds data is the first one lost.
        let bad = dataRegion(from: lie == .dropEveryWrite ? 0 : 20)
        let at = UInt64(bad * Self.rs)
        let dst = Self.dst
        // Aimed at a data region well after `bad`: its own copy overwrites the misdirected bytes
        // later (a zero region hit by a misdirected write is caught when it is verified: it does
        // not read back as zeros).
        let elsewhere = UInt64(dataRegion(from: bad + 40) * Self.rs)
        storage.state.withLock { s in
            s.lie = { path, offset, length in
                guard path == dst else { return nil }
                let hits = offset <= at && at < offset + UInt64(length)
                switch lie {
                case .dropEveryWrite: return .drop
                case .corruptOneRegion: return hits ? .corrupt : nil
                case .misdirectOneRegion: return hits ? .misdirect(elsewhere) : nil
                }
            }
        }
        storage.beginTrace()
        return Setup(sc: sc, storage: storage, job: job, bad: bad)
    }

    /// Regions whose source was released (any sector) while the destination's durable copy of
    /// them differs from the original: data that exists nowhere any more.
    func lostRegions(_ s: Setup) -> [Int] {
        let (src, durable) = s.storage.state.withLock { ($0.files[Self.src]!, $0.durable[Self.dst]) }
        let dest = durable?.data ?? []
        var lost: [Int] = []
        for r in 0..<(s.sc.image.count + Self.rs - 1) / Self.rs {
            let lo = r * Self.rs, hi = min(s.sc.image.count, lo + Self.rs)
            let released = (lo / CrashFile.sector..<(hi + CrashFile.sector - 1) / CrashFile.sector).contains {
                src.released[$0]
            }
            guard released else { continue }
            if dest.count < hi || Array(dest[lo..<hi]) != Array(s.sc.image[lo..<hi]) { lost.append(r) }
        }
        return lost
    }

    func committedMap(_ s: Setup) throws -> RegionMap {
        let after = CrashableStorage(files: s.storage.snapshotNow.materialize(.keepAll))
        return try MetadataStore.open(path: Self.meta, storage: after, readOnly: true).0.committedMap
    }

    @Test(arguments: Lie.allCases) func withoutVerifyTheSourceIsReleasedForBytesTheDestinationLost(lie: Lie)
        async throws
    {
        let s = try await setup(lie, verify: false)
        try await s.job.start()
        #expect(await s.job.waitUntilSettled() == .complete, "\(lie): the job completes, none the wiser")
        await s.job.close()
        #expect(s.storage.state.withLock { $0.liesTold } > 0)
        let lost = lostRegions(s)
        #expect(lost.contains(s.bad), "\(lie): region \(s.bad) released and lost; lost: \(lost.prefix(8))")
        print("\(lie) without verify: complete, \(lost.count) region(s) released whose copy the destination lost")
    }

    @Test(arguments: Lie.allCases) func withVerifyTheJobFailsWithDestinationMismatchAndKeepsTheSource(lie: Lie)
        async throws
    {
        let s = try await setup(lie, verify: true)
        try await s.job.start()
        #expect(await s.job.waitUntilSettled() == .failed, "\(lie)")
        let e = try #require(await s.job.lastError)
        #expect(e.code == .destinationMismatch, "\(lie): \(e)")
        let m = try #require(e.mismatch)
        #expect(m.region == s.bad, "\(lie): mismatch at region \(m.region), expected \(s.bad)")
        #expect(e.region == s.bad)
        let regionBytes = s.bad * Self.rs..<(s.bad + 1) * Self.rs
        let want = s.sc.image[regionBytes].withUnsafeBytes { RegionDigest.sha256Hex($0) }
        #expect(m.expectedDigest == want, "\(lie): the source digest of the region")
        #expect(m.foundDigest != want)
        #expect(regionBytes.contains(Int(m.offset)), "\(lie): offset \(m.offset) inside region \(s.bad)")
        if lie == .corruptOneRegion {
            // The flipped byte is the first of the write: the region's first byte that holds data.
            #expect(m.offset == UInt64(s.bad * Self.rs))
        }
        let st = await s.job.status()
        #expect(st.error?.code == "DestinationMismatch")
        #expect(st.error?.offset == m.offset)
        #expect(st.error?.expectedDigest == want)
        #expect(st.error?.foundDigest == m.foundDigest)
        #expect(st.verify?.enabled == true)
        #expect(st.verify?.mismatches == 1)
        #expect(st.verify?.readBack == "device")
        #expect(st.metadata.mode == .rw, "nothing about the metadata failed: the job resumes from it")
        // Not committed, not released; nothing released anywhere that the destination lost.
        #expect(!(try committedMap(s)[s.bad]), "\(lie): the mismatched region is recorded")
        #expect(!s.storage.file(Self.src)!.released[s.bad * Self.rs / CrashFile.sector])
        #expect(lostRegions(s).isEmpty, "\(lie): released but lost: \(lostRegions(s).prefix(8))")
        #expect(s.storage.violations.isEmpty, "\(s.storage.violations.prefix(3))")

        // The operator fixes the device; resume copies the region again and completes.
        s.storage.state.withLock { $0.lie = nil }
        try await s.job.start()
        #expect(await s.job.waitUntilSettled() == .complete, "\(lie): resumed job completes")
        let after = await s.job.status()
        #expect((after.verify?.verifiedBytes ?? 0) > 0)
        await s.job.close()
        #expect(CrashHarness.check(s.storage, s.sc).isEmpty, "\(lie): \(CrashHarness.check(s.storage, s.sc))")
        print(
            "\(lie) with verify: DestinationMismatch at region \(m.region) offset \(m.offset), source kept; resumed to completion"
        )
    }
}
