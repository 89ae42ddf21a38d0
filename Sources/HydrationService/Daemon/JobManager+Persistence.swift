import ControlProtocol
import Foundation
import HydrationEngine
import Logging

extension JobManager {
    // MARK: persistence

    /// Saves a definition durably, on an I/O thread (it fsyncs): write a temporary file, fsync,
    /// rename, fsync the directory, so a crash leaves the old or the new file. A failure leaves
    /// the record as it was: `previous` (the record this replaces) is written back if the rename
    /// happened and what followed failed, and a new record (`previous` nil) is removed.
    func persist(_ def: JobDefinition) async throws(HydrationError) {
        // Every caller updates a listed job: its record is the listed definition.
        try await persist(def, previous: jobs[def.name]?.definition ?? def)
    }

    func persist(_ def: JobDefinition, previous: JobDefinition?) async throws(HydrationError) {
        let path = definitionPath(def.name)
        let data: Data, old: Data?
        do {
            data = try JobRecords.encode(def)
            old = try previous.map { try JobRecords.encode($0) }
        } catch {
            throw HydrationError(.ioError, "encoding job definition \(path): \(error)", path: path)
        }
        do {
            try await io.run { try Self.writeDurably(data, to: path, previous: old) }
        } catch let e as StorageError {
            // IOError with its errno (ENOSPC...), not NoSpace: that code says the job failed, and
            // it has not (its record is as it was).
            throw HydrationError(.ioError, "saving job record \(path): \(e)", errno: e.errno, path: path)
        } catch {
            throw HydrationError(.ioError, "saving job record \(path): \(error)", path: path)
        }
    }

    /// Writes `data` to `path` through a temporary file and a rename, durably. On a failure the
    /// temporary file is removed, and once the rename has happened `path` is put back as it was:
    /// `previous` written again the same way, or (nil) the file removed; all of this is synced.
    /// The directory is opened before anything is written, so that running out of descriptors
    /// (EMFILE) fails before the rename, not after it.
    static func writeDurably(_ data: Data, to path: String, previous: Data? = nil) throws {
        let dir = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let dirFD = open(dir.isEmpty ? "/" : dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard dirFD >= 0 else { throw StorageError(.syncDirectory, path: dir, errno: errno) }
        defer { close(dirFD) }
        try replace(path, with: data, dirFD: dirFD)
        guard fsync(dirFD) == 0 else {
            let e = StorageError(.syncDirectory, path: dir, errno: errno)
            if let previous {
                try? replace(path, with: previous, dirFD: dirFD)
            } else {
                unlink(path)
            }
            _ = fsync(dirFD)
            throw e
        }
    }

    /// Temporary file, fsync, rename (the directory is not synced); the temporary file is
    /// removed on a failure.
    static func replace(_ path: String, with data: Data, dirFD: Int32) throws {
        let tmp = path + ".tmp"
        do {
            let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            guard fd >= 0 else { throw StorageError(.create, path: tmp, errno: errno) }
            defer { close(fd) }
            try data.withUnsafeBytes { raw in
                var off = 0
                while off < raw.count {
                    let n = write(fd, raw.baseAddress! + off, raw.count - off)
                    if n < 0 { if errno == EINTR { continue }; throw StorageError(.write, path: tmp, errno: errno) }
                    off += n
                }
            }
            guard fsync(fd) == 0 else { throw StorageError(.sync, path: tmp, errno: errno) }
            guard rename(tmp, path) == 0 else { throw StorageError(.create, path: path, errno: errno) }
        } catch {
            unlink(tmp)
            throw error
        }
    }
}
