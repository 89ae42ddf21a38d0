import ControlProtocol
import Foundation
import Logging

extension JobManager {
    /// The kept records: those that read, and those that do not (with what could be recovered
    /// from them: they still reserve what they name). Read on an I/O thread.
    func keptScan() async -> (readable: [(record: KeptRecord, file: String)], unreadable: [UnreadableRecord]) {
        let dir = keptDirectory
        let storage = self.storage
        let read =
            (try? await io.run { () -> ([(KeptRecord, String)], [UnreadableRecord]) in
                let names: [String]
                switch JobRecords.list(dir) {
                case .success(let n): names = n ?? []
                case .failure(let e):
                    // A kept/ that cannot be listed may hold records: refused as one unreadable record
                    // that names nothing.
                    return (
                        [], [UnreadableRecord(name: "", file: dir, reason: e.reason, errno: e.errno, salvaged: .init())]
                    )
                }
                var out: [(KeptRecord, String)] = []
                var bad: [UnreadableRecord] = []
                for file in names where file.hasSuffix(".json") && !file.hasPrefix(".") {
                    let path = dir + "/" + file
                    let bytes = JobRecords.readBytes(path)
                    switch bytes.flatMap({ JobRecords.decode(KeptRecord.self, $0) }) {
                    case .success(let r): out.append((r, path))
                    case .failure(let e):
                        bad.append(
                            UnreadableRecord.examine(
                                name: String(file.dropLast(".json".count)), file: path, bytes: try? bytes.get(),
                                reason: e.reason, errno: e.errno, defaultMetadata: nil, storage: storage))
                    }
                }
                return (out, bad)
            }) ?? ([], [])
        for u in read.1 {
            logger.error(
                "kept job record unreadable; what it names stays reserved",
                metadata: [
                    "path": "\(u.file)", "reason": "\(u.reason)", "reserved_sources": "\(u.sources)",
                    "reserved_destinations": "\(u.dests)",
                ])
        }
        return (read.0.map { (record: $0.0, file: $0.1) }, read.1)
    }

    /// Every kept record that reads.
    func keptRecords() async -> [(record: KeptRecord, file: String)] {
        await keptScan().readable
    }
}
