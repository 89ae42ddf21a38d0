import ControlProtocol
import Foundation
import HydrationEngine
import Logging

extension JobManager {
    /// What other jobs still need, so that no new job may write to it or release it: the source
    /// and destination of every job that is not complete (live, or listed as failed because it
    /// could not be opened: its devices are unlocked, but its data is not free), and the source
    /// and destination of every kept record. (A complete job needs nothing: it never touches its
    /// devices again, not even to finish releases a crash left pending.) A discard_source job's source is not
    /// even to be read by a new job (it is being punched).
    func reservations(except keptFile: String?, job skipped: String? = nil) async -> [Reservation] {
        var out: [Reservation] = []
        for (name, entry) in jobs where name != skipped {
            let d = entry.definition
            switch entry {
            case .live(let job, _):
                if await job.currentState != .complete {
                    out.append(
                        Reservation(
                            path: d.source, role: "source", owner: name, keptMetadata: nil, noReaders: d.discardSource))
                    out.append(
                        Reservation(path: d.dest, role: "destination", owner: name, keptMetadata: nil, noReaders: false)
                    )
                } else if published.contains(name) {
                    // Complete, but its clone is still served over NBD (reads and writes go there).
                    out.append(
                        Reservation(
                            path: d.dest, role: "destination (served over NBD)", owner: name, keptMetadata: nil,
                            noReaders: false))
                }
            case .broken(_, _, let h):
                if h?.complete != true {
                    out.append(
                        Reservation(
                            path: d.source, role: "source", owner: name, keptMetadata: nil, noReaders: d.discardSource))
                    out.append(
                        Reservation(path: d.dest, role: "destination", owner: name, keptMetadata: nil, noReaders: false)
                    )
                }
            case .finished:
                if published.contains(name) {
                    out.append(
                        Reservation(
                            path: d.dest, role: "destination (served over NBD)", owner: name, keptMetadata: nil,
                            noReaders: false))
                }
            case .unreadable(let u):
                // Complete or not, unknown until the record is read: everything it names.
                out += Self.reservations(of: u, kept: false)
            case .parked:
                // As exclusive as while it was open (where its locks refused even readers): a
                // paused job must find its devices free when it is resumed.
                out.append(Reservation(path: d.source, role: "source", owner: name, keptMetadata: nil, noReaders: true))
                out.append(
                    Reservation(path: d.dest, role: "destination", owner: name, keptMetadata: nil, noReaders: true))
            }
        }
        let kept = await keptScan()
        for (record, file) in kept.readable where file != keptFile {
            let k = record.definition
            out.append(
                Reservation(
                    path: k.source, role: "source", owner: k.name, keptMetadata: k.metadata, noReaders: k.discardSource)
            )
            out.append(
                Reservation(
                    path: k.dest, role: "destination", owner: k.name, keptMetadata: k.metadata, noReaders: false))
        }
        for u in kept.unreadable where u.file != keptFile {
            out += Self.reservations(of: u, kept: true)
        }
        return out
    }

    /// What an unreadable record reserves: every source and destination found in it or in its
    /// metadata; with none found, a reservation of everything (`Reservation.everything`).
    static func reservations(of u: UnreadableRecord, kept: Bool) -> [Reservation] {
        let e = u.error(kept: kept)
        if u.namesNothing {
            return [
                Reservation(
                    path: "", role: "everything", owner: u.name, keptMetadata: nil, noReaders: true, unreadable: e)
            ]
        }
        return u.sources.map {
            Reservation(
                path: $0, role: "source", owner: u.name, keptMetadata: nil, noReaders: u.discardSource, unreadable: e)
        }
            + u.dests.map {
                Reservation(
                    path: $0, role: "destination", owner: u.name, keptMetadata: nil, noReaders: false, unreadable: e)
            }
    }

    /// Refuses a new job that would write to (its destination), release (its discard_source
    /// source) or read while it is being punched (any source) what another job still needs —
    /// by path, and by what the bytes live on (a loop device over the file, a partition of the
    /// disk, ...), so an alias does not get around it.
    func checkReservations(_ def: JobDefinition, except keptFile: String?, job skipped: String? = nil)
        async throws(HydrationError)
    {
        let reserved = await reservations(except: keptFile, job: skipped)
        guard !reserved.isEmpty else { return }
        if let blind = reserved.first(where: { $0.role == "everything" }), let e = blind.unreadable {
            // A record from which no device could be recovered: nothing can be checked against it.
            throw e
        }
        let storage = self.storage
        let cached = reservedFileStacks
        let conflict: (String, String, Reservation)?
        let learned: [String: CachedStack]
        do {
            (conflict, learned) = try await io.run {
                () throws -> ((String, String, Reservation)?, [String: CachedStack]) in
                var targets: [(String, String, Bool)] = [("destination", def.dest, false)]
                targets.append(("source", def.source, !def.discardSource))
                var stacks: [String: StorageStack?] = [:]
                var learned: [String: CachedStack] = [:]
                let newPaths = Set(targets.map(\.1))
                func stack(_ p: String) -> StorageStack? {
                    if let s = stacks[p] { return s }
                    // A reserved regular file's stack (file, filesystem, disk) is reused while the
                    // path names the same file: with thousands of jobs, recomputing every one at
                    // each create made creation quadratic. A loop device or anything else attached
                    // over it later appears in the new job's own stack, computed fresh.
                    var st = stat()
                    let isFile = !newPaths.contains(p) && stat(p, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
                    if isFile, let c = cached[p], c.device == UInt64(st.st_dev), c.inode == UInt64(st.st_ino) {
                        stacks[p] = c.stack
                        return c.stack
                    }
                    let s = (try? storage.stack(of: p)) ?? nil
                    stacks[p] = s
                    if isFile {
                        learned[p] = CachedStack(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), stack: s)
                    }
                    return s
                }
                let found = Reservations.firstConflict(
                    targets.map { Reservations.Target(label: $0.0, path: $0.1, readOnly: $0.2) },
                    reserved.map { Reservations.Claim(path: $0.path, role: $0.role, noReaders: $0.noReaders) },
                    stack: stack)
                return (found.map { ($0.target.label, $0.detail, reserved[$0.claim]) }, learned)
            }
        } catch {
            throw HydrationError(.ioError, "checking the devices of other jobs: \(error)")
        }
        reservedFileStacks.merge(learned) { $1 }
        if reservedFileStacks.count > 4 * max(64, jobs.count) { reservedFileStacks = learned }
        guard let (label, detail, r) = conflict else { return }
        let what = label == "destination" ? "written" : (def.discardSource ? "released" : "read while it is released")
        if var e = r.unreadable {
            e.message =
                "\(label) \(def.source == detail || def.dest == detail ? detail : "(" + detail + ")") is the \(r.role) \(r.path) of job \(r.owner.isEmpty ? "(unknown)" : r.owner) and may not be \(what): "
                + e.message
            throw e
        }
        if let keptMetadata = r.keptMetadata {
            var e = HydrationError(
                .dataAtRisk,
                "\(label) \(def.source == detail || def.dest == detail ? detail : "(" + detail + ")") is the \(r.role) \(r.path) of removed job \(r.owner), whose metadata was kept at \(keptMetadata): it holds data no other copy has and may not be \(what). Resume that job (clonectl start \(r.owner) --metadata \(keptMetadata) --source SOURCE --dest DEST), or delete \(keptMetadata) and its record in the state directory's kept/ by hand once that data is no longer needed"
            )
            e.path = r.path
            throw e
        }
        var e = HydrationError(
            .deviceInUse,
            "\(label) \(def.source == detail || def.dest == detail ? detail : "(" + detail + ")") is the \(r.role) \(r.path) of job \(r.owner), which still needs it (it is not complete, or its releases are pending): it may not be \(what). Finish or remove job \(r.owner) first"
        )
        e.path = r.path
        e.holder = r.owner
        throw e
    }

    struct CachedStack: Sendable {
        var device: UInt64
        var inode: UInt64
        var stack: StorageStack?
    }

    struct Reservation: Sendable {
        var path: String
        var role: String
        var owner: String
        /// Set for a kept record (a removed job): where its metadata is.
        var keptMetadata: String?
        /// A discard_source job's source: being punched, so not even to be read by a new job.
        var noReaders: Bool
        /// Set when the reservation comes from a record that cannot be read: the refusal is
        /// this error (naming the file and why), with the conflict added.
        var unreadable: HydrationError? = nil
    }
}
