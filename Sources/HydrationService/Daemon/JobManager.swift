import ControlProtocol
import Foundation
import HydrationEngine
import Logging

/// The daemon's jobs: creation with validation, persistence of their definitions, restoration at
/// start, and the control operations. Every method is safe to call while jobs copy.
public actor JobManager {
    enum Entry {
        case live(HydrationJob, JobDefinition)
        /// Could not be opened at start (metadata corrupt, device gone...): reported as failed —
        /// or, when its metadata (read-only) says it completed, as complete: a finished job's
        /// source may well have been deleted since.
        case broken(JobDefinition, HydrationError, MetadataHeader?)
        /// Complete, every release recorded as done: restored from its metadata alone. Its devices
        /// are never opened again (they may belong to other jobs or other owners by now).
        case finished(JobDefinition, MetadataHeader)
        /// Its record (`jobs/NAME.json`) cannot be read: listed as failed with
        /// `JobRecordUnreadable`, every device found in the record's text or its metadata stays
        /// reserved, and nothing is opened, written or released until the operator acts.
        case unreadable(UnreadableRecord)
        /// Paused by the operator, and closed: it holds no descriptor, thread or lock (a daemon
        /// with thousands of paused jobs must not run out of descriptors). Its devices stay
        /// reserved (`reservations`); a resume opens it again through `HydrationJob.open`,
        /// which confirms that the devices are still the job's own, as a restart does.
        case parked(JobDefinition, ParkedJob)

        var definition: JobDefinition {
            switch self {
            case .live(_, let d), .broken(let d, _, _), .finished(let d, _), .parked(let d, _): return d
            case .unreadable(let u): return u.definition
            }
        }

        var isCompleteOffline: Bool {
            switch self {
            case .broken(_, _, let h?): return h.complete
            case .finished: return true
            default: return false
            }
        }
    }

    /// What a parked job reports: its status when it was closed (paused, everything committed).
    struct ParkedJob: Sendable {
        var status: JobStatus
        var jobID: String
    }

    public nonisolated let stateDirectory: String
    let storage: any StorageProvider
    let io: IOExecutor
    let logger: Logger
    var jobs: [String: Entry] = [:] {
        didSet { stateChanges.signal() }
    }
    /// Bumped by every job's state change and every change to `jobs`: status watchers wait on it.
    public nonisolated let stateChanges = StateChangeSignal()
    /// The last status of jobs closed by `retireCompleteJobs` (their counters: commits, bytes
    /// discarded...), which the metadata alone does not have.
    var retiredStatus: [String: JobStatus] = [:]
    /// Names being created right now (creation awaits I/O; actor reentrancy must not let two
    /// Starts of one name both proceed).
    var creating: Set<String> = []
    /// One control operation at a time per job name (FIFO): each reads state, awaits, and writes
    /// the definition back, so interleaving them would lose updates (a pause undone by a
    /// concurrent set, a removed job resurrected by a concurrent persist).
    var operationQueues: [String: [CheckedContinuation<Void, Never>]] = [:]
    /// Jobs with a remote source that could not be reached when they were opened: retried in
    /// the background until the server answers (`retryUnreachableSource`).
    var reopenTasks: [String: Task<Void, Never>] = [:]
    /// Set by `shutdown`: a background reopen that finishes after it must not leave a job open.
    var shuttingDown = false
    var stateLock: StateDirectoryLock?
    /// Where exported jobs are served (nil: this manager serves none, and refuses `export`).
    public nonisolated let exportHost: JobExportHost?
    /// Jobs whose export is in `exportHost`'s registry now.
    var published: Set<String> = []
    /// Destinations opened only to serve a complete job restored from its metadata alone
    /// (`CompleteCloneExport`): closed when the export is withdrawn.
    var servedDestinations: [String: any StorageDevice] = [:]
    /// Why an exported job's clone is not served (shown as its status error): a complete job's
    /// destination that is no longer the job's own, or gone.
    var exportErrors: [String: HydrationError] = [:]

    public static let maxNameLength = 64

    public init(
        stateDirectory: String, storage: any StorageProvider = PosixStorage(), io: IOExecutor, logger: Logger,
        exports: JobExportHost? = nil
    ) {
        self.stateDirectory = stateDirectory
        self.storage = storage
        self.io = io
        self.logger = logger
        self.exportHost = exports
    }

    var jobsDirectory: String { stateDirectory + "/jobs" }
    var keptDirectory: String { stateDirectory + "/kept" }
    func definitionPath(_ name: String) -> String { jobsDirectory + "/\(name).json" }

    /// Stacks of reserved regular files, by path (`checkReservations`).
    var reservedFileStacks: [String: CachedStack] = [:]
}
