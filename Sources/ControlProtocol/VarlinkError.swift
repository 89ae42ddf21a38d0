import struct FoundationEssentials.Data

/// A named Varlink error: what a server replies instead of a method's output, and what
/// `VarlinkClient` throws when it receives one.
///
/// `name` is the fully qualified error name (`org.hydrationd.Control.NoSuchJob`); `parameters` are the
/// error's fields as declared in the interface. Build known errors with the static constructors so the
/// parameter names always match the interface definition.
public struct VarlinkError: Error, Sendable, Equatable, CustomStringConvertible {
    public var name: String
    public var parameters: [String: JSONValue]

    public init(name: String, parameters: [String: JSONValue] = [:]) {
        self.name = name
        self.parameters = parameters
    }

    public enum Name {
        public static let noSuchJob = "org.hydrationd.Control.NoSuchJob"
        public static let jobExists = "org.hydrationd.Control.JobExists"
        public static let jobRunning = "org.hydrationd.Control.JobRunning"
        public static let invalidParameter = "org.hydrationd.Control.InvalidParameter"
        public static let deviceInUse = "org.hydrationd.Control.DeviceInUse"
        public static let sizeMismatch = "org.hydrationd.Control.SizeMismatch"
        public static let metadataCorrupt = "org.hydrationd.Control.MetadataCorrupt"
        public static let metadataExists = "org.hydrationd.Control.MetadataExists"
        public static let permissionDenied = "org.hydrationd.Control.PermissionDenied"
        public static let jobFailed = "org.hydrationd.Control.JobFailed"
        public static let ioError = "org.hydrationd.Control.IOError"
        public static let invalidMessage = "org.hydrationd.Control.InvalidMessage"
        public static let messageTooLarge = "org.hydrationd.Control.MessageTooLarge"
        public static let tooManyConnections = "org.hydrationd.Control.TooManyConnections"
        public static let internalError = "org.hydrationd.Control.InternalError"
        public static let dataAtRisk = "org.hydrationd.Control.DataAtRisk"
        public static let deviceUnconfirmed = "org.hydrationd.Control.DeviceUnconfirmed"
        public static let exportInUse = "org.hydrationd.Control.ExportInUse"
        public static let jobRecordUnreadable = "org.hydrationd.Control.JobRecordUnreadable"

        public static let serviceInterfaceNotFound = "org.varlink.service.InterfaceNotFound"
        public static let serviceMethodNotFound = "org.varlink.service.MethodNotFound"
        public static let serviceMethodNotImplemented = "org.varlink.service.MethodNotImplemented"
        public static let serviceInvalidParameter = "org.varlink.service.InvalidParameter"
        public static let servicePermissionDenied = "org.varlink.service.PermissionDenied"
        public static let serviceExpectedMore = "org.varlink.service.ExpectedMore"
    }

    /// The known errors, for `switch`; `.other` for any name this version does not know.
    public enum Kind: Sendable, Equatable {
        case noSuchJob, jobExists, jobRunning, invalidParameter, deviceInUse, sizeMismatch, metadataCorrupt
        case permissionDenied, jobFailed, ioError, invalidMessage, messageTooLarge, tooManyConnections
        case internalError, dataAtRisk, deviceUnconfirmed, exportInUse, jobRecordUnreadable, metadataExists
        case interfaceNotFound, methodNotFound, methodNotImplemented, serviceInvalidParameter
        case servicePermissionDenied, expectedMore
        case other
    }

    public var kind: Kind {
        switch name {
        case Name.noSuchJob: return .noSuchJob
        case Name.jobExists: return .jobExists
        case Name.jobRunning: return .jobRunning
        case Name.invalidParameter: return .invalidParameter
        case Name.deviceInUse: return .deviceInUse
        case Name.sizeMismatch: return .sizeMismatch
        case Name.metadataCorrupt: return .metadataCorrupt
        case Name.metadataExists: return .metadataExists
        case Name.permissionDenied: return .permissionDenied
        case Name.jobFailed: return .jobFailed
        case Name.ioError: return .ioError
        case Name.invalidMessage: return .invalidMessage
        case Name.messageTooLarge: return .messageTooLarge
        case Name.tooManyConnections: return .tooManyConnections
        case Name.internalError: return .internalError
        case Name.dataAtRisk: return .dataAtRisk
        case Name.deviceUnconfirmed: return .deviceUnconfirmed
        case Name.exportInUse: return .exportInUse
        case Name.jobRecordUnreadable: return .jobRecordUnreadable
        case Name.serviceInterfaceNotFound: return .interfaceNotFound
        case Name.serviceMethodNotFound: return .methodNotFound
        case Name.serviceMethodNotImplemented: return .methodNotImplemented
        case Name.serviceInvalidParameter: return .serviceInvalidParameter
        case Name.servicePermissionDenied: return .servicePermissionDenied
        case Name.serviceExpectedMore: return .expectedMore
        default: return .other
        }
    }

    /// True for errors that reject a request as wrong (bad name, bad parameter, conflicting device,
    /// permission), as opposed to protocol or server failures. clonectl maps these to exit code 65.
    public var isRequestRejection: Bool {
        switch kind {
        case .noSuchJob, .jobExists, .jobRunning, .invalidParameter, .deviceInUse, .sizeMismatch,
            .metadataCorrupt, .permissionDenied, .serviceInvalidParameter, .servicePermissionDenied, .dataAtRisk,
            .deviceUnconfirmed, .exportInUse, .jobRecordUnreadable, .metadataExists:
            return true
        default:
            return false
        }
    }

    /// A string parameter of the error, if present.
    public func string(_ key: String) -> String? { parameters[key]?.stringValue }

    // MARK: org.hydrationd.Control errors

    public static func noSuchJob(_ name: String) -> VarlinkError {
        VarlinkError(name: Name.noSuchJob, parameters: ["name": .string(name)])
    }

    public static func jobExists(_ name: String) -> VarlinkError {
        VarlinkError(name: Name.jobExists, parameters: ["name": .string(name)])
    }

    /// The job is active and the request needs it stopped first (e.g. `Remove` without `force`).
    public static func jobRunning(_ name: String, state: JobStatus.State) -> VarlinkError {
        VarlinkError(name: Name.jobRunning, parameters: ["name": .string(name), "state": .string(state.rawValue)])
    }

    public static func invalidParameter(_ parameter: String, reason: String) -> VarlinkError {
        VarlinkError(
            name: Name.invalidParameter, parameters: ["parameter": .string(parameter), "reason": .string(reason)])
    }

    public static func deviceInUse(path: String, job: String, message: String = "") -> VarlinkError {
        VarlinkError(
            name: Name.deviceInUse,
            parameters: ["path": .string(path), "job": .string(job), "message": .string(message)])
    }

    public static func sizeMismatch(sourceBytes: UInt64, destBytes: UInt64, message: String = "") -> VarlinkError {
        VarlinkError(
            name: Name.sizeMismatch,
            parameters: [
                "source_bytes": .int(Int64(clamping: sourceBytes)), "dest_bytes": .int(Int64(clamping: destBytes)),
                "message": .string(message),
            ]
        )
    }

    public static func metadataCorrupt(path: String, reason: String) -> VarlinkError {
        VarlinkError(name: Name.metadataCorrupt, parameters: ["path": .string(path), "reason": .string(reason)])
    }

    /// A create whose metadata file already exists (another job's, or one left behind): nothing
    /// was created or changed.
    public static func metadataExists(path: String, message: String) -> VarlinkError {
        VarlinkError(name: Name.metadataExists, parameters: ["path": .string(path), "message": .string(message)])
    }

    public static func permissionDenied(method: String, reason: String) -> VarlinkError {
        VarlinkError(name: Name.permissionDenied, parameters: ["method": .string(method), "reason": .string(reason)])
    }

    public static func jobFailed(_ name: String, code: String, message: String) -> VarlinkError {
        VarlinkError(
            name: Name.jobFailed,
            parameters: ["name": .string(name), "code": .string(code), "message": .string(message)]
        )
    }

    public static func ioError(path: String?, errno: Int32?, message: String) -> VarlinkError {
        VarlinkError(
            name: Name.ioError,
            parameters: [
                "path": path.map(JSONValue.string) ?? .null,
                "errno": errno.map { JSONValue.int(Int64($0)) } ?? .null,
                "message": .string(message),
            ]
        )
    }

    /// The request would destroy the only record of data the user still needs (e.g. removing a
    /// discard_source job whose source is partly released); `message` says what and how to go on.
    public static func dataAtRisk(_ name: String, message: String) -> VarlinkError {
        VarlinkError(name: Name.dataAtRisk, parameters: ["name": .string(name), "message": .string(message)])
    }

    /// The device at a job's path cannot be confirmed to be the job's own (renumbered, replaced,
    /// swapped, or without a stable identity): nothing is written or released.
    public static func deviceUnconfirmed(path: String, message: String) -> VarlinkError {
        VarlinkError(name: Name.deviceUnconfirmed, parameters: ["path": .string(path), "message": .string(message)])
    }

    /// `Remove` of a job whose NBD export has `clients` connections, without `force`.
    public static func exportInUse(_ name: String, clients: Int, message: String) -> VarlinkError {
        VarlinkError(
            name: Name.exportInUse,
            parameters: ["name": .string(name), "clients": .int(Int64(clients)), "message": .string(message)])
    }

    /// A record in the daemon's state directory cannot be read (`path`, the message says why):
    /// the job `name` stays listed, failed, with its devices reserved, and nothing is written or
    /// released for it until the operator repairs the file or removes the job with force. An
    /// unreadable kept record (`name` empty) refuses new jobs on what it may still need.
    public static func jobRecordUnreadable(_ name: String, path: String, message: String) -> VarlinkError {
        VarlinkError(
            name: Name.jobRecordUnreadable,
            parameters: ["name": .string(name), "path": .string(path), "message": .string(message)])
    }

    public static func invalidMessage(_ reason: String) -> VarlinkError {
        VarlinkError(name: Name.invalidMessage, parameters: ["reason": .string(reason)])
    }

    public static func messageTooLarge(limit: Int) -> VarlinkError {
        VarlinkError(name: Name.messageTooLarge, parameters: ["limit": .int(Int64(limit))])
    }

    public static func tooManyConnections(limit: Int) -> VarlinkError {
        VarlinkError(name: Name.tooManyConnections, parameters: ["limit": .int(Int64(limit))])
    }

    public static func internalError(_ message: String) -> VarlinkError {
        VarlinkError(name: Name.internalError, parameters: ["message": .string(message)])
    }

    // MARK: org.varlink.service errors

    public static func interfaceNotFound(_ interface: String) -> VarlinkError {
        VarlinkError(name: Name.serviceInterfaceNotFound, parameters: ["interface": .string(interface)])
    }

    public static func methodNotFound(_ method: String) -> VarlinkError {
        VarlinkError(name: Name.serviceMethodNotFound, parameters: ["method": .string(method)])
    }

    public static func methodNotImplemented(_ method: String) -> VarlinkError {
        VarlinkError(name: Name.serviceMethodNotImplemented, parameters: ["method": .string(method)])
    }

    /// The standard error for a parameter that is missing, of the wrong type, or unknown.
    public static func serviceInvalidParameter(_ parameter: String) -> VarlinkError {
        VarlinkError(name: Name.serviceInvalidParameter, parameters: ["parameter": .string(parameter)])
    }

    public static var expectedMore: VarlinkError { VarlinkError(name: Name.serviceExpectedMore) }

    // MARK: description

    public var description: String {
        let p = parameters
        switch kind {
        case .noSuchJob: return "no job named '\(p["name"]?.stringValue ?? "?")'"
        case .jobExists: return "a job named '\(p["name"]?.stringValue ?? "?")' already exists"
        case .jobRunning:
            return
                "job '\(p["name"]?.stringValue ?? "?")' is \(p["state"]?.stringValue ?? "active"); pause it first or use force"
        case .invalidParameter, .serviceInvalidParameter:
            let reason = p["reason"]?.stringValue.map { ": \($0)" } ?? ""
            return "invalid parameter '\(p["parameter"]?.stringValue ?? "?")'\(reason)"
        case .deviceInUse:
            // Held by something that is not one of this daemon's jobs (a loop device, a process, a
            // mount): the daemon's message names it.
            if p["job"]?.stringValue ?? "" == "", let m = p["message"]?.stringValue, !m.isEmpty { return m }
            return "\(p["path"]?.stringValue ?? "device") is already used by job '\(p["job"]?.stringValue ?? "?")'"
        case .sizeMismatch:
            return
                "destination (\(p["dest_bytes"]?.int64Value ?? 0) bytes) is smaller than source (\(p["source_bytes"]?.int64Value ?? 0) bytes)"
        case .metadataCorrupt:
            let path = p["path"]?.stringValue ?? ""
            return "metadata \(path.isEmpty ? "" : path + " ")is corrupt: \(p["reason"]?.stringValue ?? "")"
        case .metadataExists:
            return p["message"]?.stringValue ?? "metadata \(p["path"]?.stringValue ?? "?") already exists"
        case .permissionDenied:
            return "permission denied for \(p["method"]?.stringValue ?? "method"): \(p["reason"]?.stringValue ?? "")"
        case .jobFailed:
            return
                "job '\(p["name"]?.stringValue ?? "?")' failed: \(p["code"]?.stringValue ?? ""): \(p["message"]?.stringValue ?? "")"
        case .ioError:
            return "I/O error\(p["path"]?.stringValue.map { " on \($0)" } ?? ""): \(p["message"]?.stringValue ?? "")"
        case .invalidMessage: return "invalid Varlink message: \(p["reason"]?.stringValue ?? "")"
        case .messageTooLarge: return "message larger than \(p["limit"]?.int64Value ?? 0) bytes"
        case .tooManyConnections: return "too many connections to the daemon (limit \(p["limit"]?.int64Value ?? 0))"
        case .internalError: return "internal daemon error: \(p["message"]?.stringValue ?? "")"
        case .dataAtRisk: return "job '\(p["name"]?.stringValue ?? "?")': \(p["message"]?.stringValue ?? "")"
        case .deviceUnconfirmed:
            return p["message"]?.stringValue ?? "device \(p["path"]?.stringValue ?? "?") cannot be confirmed"
        case .jobRecordUnreadable:
            return p["message"]?.stringValue ?? "job record \(p["path"]?.stringValue ?? "?") cannot be read"
        case .exportInUse:
            let n = p["clients"]?.int64Value ?? 0
            return
                "job '\(p["name"]?.stringValue ?? "?")' is exported over NBD and \(n) client\(n == 1 ? " is" : "s are") connected"
        case .interfaceNotFound: return "interface not found: \(p["interface"]?.stringValue ?? "?")"
        case .methodNotFound: return "method not found: \(p["method"]?.stringValue ?? "?")"
        case .methodNotImplemented: return "method not implemented: \(p["method"]?.stringValue ?? "?")"
        case .servicePermissionDenied: return "permission denied"
        case .expectedMore: return "method must be called with more=true"
        case .other:
            return p.isEmpty
                ? name
                : "\(name) \(String(decoding: (try? VarlinkJSON.makeEncoder().encode(p)) ?? Data(), as: UTF8.self))"
        }
    }
}
