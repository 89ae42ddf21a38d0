import ControlProtocol

/// clonectl's exit codes (sysexits.h where one fits). Documented in docs/clonectl.md.
public enum CloneExit: Int32, Sendable, CaseIterable {
    case success = 0
    /// The job failed (`wait`, `status --watch` ending on a failed job), or `check` found the
    /// metadata invalid.
    case jobFailed = 1
    /// Bad command line: unknown option, bad size/duration, missing argument (EX_USAGE).
    case usage = 64
    /// The daemon rejected the request: unknown job, bad parameter, device in use, permission
    /// denied... (EX_DATAERR).
    case rejected = 65
    /// A metadata file given to `check`/`dump` does not exist or cannot be read (EX_NOINPUT).
    case noInput = 66
    /// The daemon is not reachable, or went away in the middle of a call (EX_UNAVAILABLE).
    case unavailable = 69
    /// The daemon failed internally or replied with something clonectl does not understand
    /// (EX_SOFTWARE).
    case software = 70
    /// The daemon reported an I/O error (EX_IOERR).
    case ioError = 74
    /// `wait --timeout` expired before the job ended (as timeout(1)).
    case timeout = 124
    /// Interrupted by Ctrl-C (128 + SIGINT).
    case interrupted = 130
}

/// A failure clonectl reports as one line on stderr and an exit code.
public struct CloneFailure: Error, Sendable, Equatable, CustomStringConvertible {
    public var message: String
    public var exit: CloneExit
    public init(_ message: String, exit: CloneExit) { self.message = message; self.exit = exit }
    public var description: String { message }

    /// Classifies what the Varlink client threw: transport failures, the daemon's named errors,
    /// or anything else.
    public static func from(_ error: any Error, socketPath: String) -> CloneFailure {
        switch error {
        case let f as CloneFailure:
            return f
        case let e as VarlinkClientError:
            switch e {
            case .unreachable, .pathTooLong, .connectionClosed, .io, .timedOut, .closed:
                if case .connectionClosed = e {
                    return CloneFailure(
                        "hydrationd at \(socketPath) closed the connection (did it stop?); check 'systemctl status hydrationd' or its log",
                        exit: .unavailable)
                }
                return CloneFailure(e.description, exit: .unavailable)
            case .invalidReply, .replyTooLarge:
                return CloneFailure("\(e.description); is clonectl the same version as hydrationd?", exit: .software)
            }
        case let v as VarlinkError:
            return CloneFailure(rejectionMessage(v), exit: exitCode(for: v))
        default:
            return CloneFailure("\(error)", exit: .software)
        }
    }

    public static func exitCode(for v: VarlinkError) -> CloneExit {
        if v.isRequestRejection { return .rejected }
        switch v.kind {
        case .jobFailed: return .jobFailed
        case .ioError: return .ioError
        case .tooManyConnections: return .unavailable
        default: return .software
        }
    }

    /// The daemon's error, with what to do about it.
    public static func rejectionMessage(_ v: VarlinkError) -> String {
        let hint: String
        switch v.kind {
        case .noSuchJob: hint = "; see 'clonectl list'"
        case .jobExists: hint = "; resume it with 'clonectl start \(v.string("name") ?? "NAME")' or pick another name"
        case .jobRunning:
            let n = v.string("name") ?? "NAME"
            return
                "job '\(n)' is \(v.string("state") ?? "active"); pause it first ('clonectl pause \(n)') or use 'clonectl remove \(n) --force'"
        case .deviceInUse:
            // hydrationd may put its whole message in `path` (not a path): print it as it is.
            if let p = v.string("path"), p.contains(" ") {
                return p + "; remove or pause the job using it, or choose another path"
            }
            // Held by something else than a job: the message says what, and what to do.
            hint = (v.string("job") ?? "").isEmpty ? "" : "; remove that job first or choose another path"
        case .deviceUnconfirmed:
            hint =
                "; if it is the job's own device after all (e.g. a disk without a serial after a reboot), 'clonectl resume NAME --accept-devices'"
        case .sizeMismatch:
            if let m = v.string("message") { return "destination too small: \(m)" }
            hint = ""
        case .invalidParameter where v.string("parameter") == "space_budget_bytes":
            hint = "; --space-budget needs a job started with --discard-source"
        case .metadataCorrupt: hint = "; inspect it with 'clonectl check'"
        case .jobRecordUnreadable: hint = ""
        case .permissionDenied, .servicePermissionDenied:
            hint = "; run as root or as a member of the daemon's --socket-group"
        case .tooManyConnections: hint = "; try again later"
        case .exportInUse:
            hint =
                "; disconnect the clients, or use 'clonectl remove \(v.string("name") ?? "NAME") --force' to disconnect them"
        case .internalError: hint = "; see the hydrationd log"
        default: hint = ""
        }
        return v.description + hint
    }
}
