import Foundation
import HydrationTestSupport
import Testing

@testable import HydrationStorage

/// A metadata file with four committed generations over two bitmap pages, and the exact map of
/// every generation, so that any successful open can be checked against a real committed state.
struct MetaFixture {
    static let path = "/meta/job.meta"
    static let regions = 40_000  // two bitmap pages
    let file: CrashFile
    let maps: [UInt64: RegionMap]
    let header: MetadataHeader

    static func make() throws -> MetaFixture {
        let storage = CrashableStorage()
        let size = UInt64(regions) * 4096 - 1000
        let options = MetadataCreateOptions(
            regionSize: 4096,
            source: DeviceRecord(
                path: "/src/disk.img", identity: DeviceIdentity(kind: .regularFile, device: 1, inode: 2, rdev: 0),
                size: size),
            dest: DeviceRecord(
                path: "/dst/disk.img", identity: DeviceIdentity(kind: .regularFile, device: 1, inode: 3, rdev: 0),
                size: size),
            discardSource: true, destZeroed: false)
        let store = try MetadataStore.create(path: path, options: options, storage: storage, nowMs: 1)
        var maps: [UInt64: RegionMap] = [1: store.committedMap]
        for (i, ranges) in [[0..<100], [30_000..<30_500, 100..<200], [200..<300, 39_000..<40_000]].enumerated() {
            let g = try store.commit(ranges, nowMs: Int64(i + 2))
            maps[g] = store.committedMap
        }
        return MetaFixture(file: storage.file(path)!, maps: maps, header: store.header)
    }

    enum Outcome { case opened(UInt64), refused(MetadataError) }

    /// Opens `data` as the metadata file. Returns the generation it opened, after checking that
    /// what it returned is exactly that committed generation; records an issue otherwise.
    func open(_ data: [UInt8], _ label: @autoclosure () -> String) -> Outcome {
        var f = file
        f.data = data
        let storage = CrashableStorage(files: [Self.path: f])
        do {
            let (store, _) = try MetadataStore.open(path: Self.path, storage: storage, readOnly: true)
            let h = store.header
            guard maps[h.generation] != nil else {
                Issue.record("\(label()): opened unknown generation \(h.generation)"); return .opened(h.generation)
            }
            // The bitmap is that generation's, or — when newer page versions were adopted because
            // the newest superblock is damaged — a later committed generation's, never anything else.
            if !maps.contains(where: { $0.key >= h.generation && $0.value == store.committedMap }) {
                Issue.record("\(label()): generation \(h.generation) opened with a bitmap that was never committed")
            }
            if h.jobID != header.jobID || h.regionSize != header.regionSize || h.targetSize != header.targetSize
                || h.source != header.source || h.dest != header.dest || h.discardSource != header.discardSource
                || h.hydratedCount != UInt64(store.committedMap.setCount)
            {
                Issue.record("\(label()): header fields differ from every committed header")
            }
            return .opened(h.generation)
        } catch {
            if error.path != Self.path || error.description.isEmpty {
                Issue.record("\(label()): error does not name the file: \(error)")
            }
            return .refused(error)
        }
    }
}

@Suite struct CrashSafetyMetadataCorruptionTests {
    /// One bit flipped (bit i % 8), then the whole byte inverted, at every byte of both
    /// superblocks: the damaged copy is never used; the other valid copy opens, exactly.
    @Test func bitFlipsAtEveryByteOfBothSuperblocks() throws {
        let fx = try MetaFixture.make()
        let g = fx.header.generation
        let currentSlot = [0, 1].first { slot in
            MetadataHeader.decode(Array(fx.file.data[slot * 4096..<(slot + 1) * 4096])).map(\.generation) == .success(g)
        }!
        var opened = [UInt64: Int](), refused = 0, cases = 0
        for slot in 0..<2 {
            for byte in 0..<4096 {
                for mask in [UInt8(1) << UInt8(byte % 8), 0xFF] {
                    var d = fx.file.data
                    d[slot * 4096 + byte] ^= mask
                    cases += 1
                    switch fx.open(d, "slot \(slot) byte \(byte) mask \(mask)") {
                    case .opened(let gen):
                        opened[gen, default: 0] += 1
                        // The damaged copy is never the one used.
                        let expected = slot == currentSlot ? g - 1 : g
                        if gen != expected {
                            Issue.record("slot \(slot) byte \(byte): opened generation \(gen), expected \(expected)")
                        }
                    case .refused(let e):
                        refused += 1
                        Issue.record("slot \(slot) byte \(byte): refused although the other copy is valid: \(e)")
                    }
                }
            }
        }
        countCrash("faults injected", cases)
        print(
            "superblock bit flips: \(cases) cases; opened the other valid copy \(opened.values.reduce(0, +)) times (generations \(opened)), refused \(refused)"
        )
        #expect(cases == 2 * 4096 * 2)
    }

    /// Both superblocks damaged: refused with a named error, never opened.
    @Test func bothSuperblocksDamagedIsRefused() throws {
        let fx = try MetaFixture.make()
        for byte in stride(from: 0, to: 4096, by: 7) {
            var d = fx.file.data
            d[byte] ^= 0x10
            d[4096 + (byte * 13) % 4096] ^= 0x01
            guard case .refused(let e) = fx.open(d, "both slots, byte \(byte)") else {
                Issue.record("byte \(byte): opened with both superblocks damaged"); continue
            }
            guard case .noValidSuperblock = e.reason else { Issue.record("byte \(byte): \(e)"); continue }
        }
    }

    /// The file truncated at every byte of the superblocks, and every 512 bytes of the pages:
    /// either refused with a named error or opened at exactly a committed generation.
    @Test func truncationAtEveryByte() throws {
        let fx = try MetaFixture.make()
        var opened = 0, refused = 0, cases = 0
        var reasons: [String: Int] = [:]
        let lengths = Array(0...8192) + Array(stride(from: 8192 + 512, through: fx.file.data.count, by: 512))
        for len in lengths {
            cases += 1
            switch fx.open(Array(fx.file.data[0..<len]), "truncated to \(len)") {
            case .opened: opened += 1
            case .refused(let e):
                refused += 1
                reasons[String(describing: e.reason).prefix(while: { $0 != "(" }).description, default: 0] += 1
                if len == fx.file.data.count { Issue.record("the intact file was refused: \(e)") }
            }
        }
        countCrash("faults injected", cases)
        print(
            "metadata truncation: \(cases) lengths; opened a committed generation \(opened), refused \(refused) (\(reasons))"
        )
        #expect(opened > 0 && refused > 0)
    }
}
