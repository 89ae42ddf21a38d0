#if canImport(Glibc)
    import Glibc
#endif

/// Constants of the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`): fixed newstyle handshake,
/// simple and structured replies. Extended headers (experimental) are not implemented.
public enum NBDProtocol {
    /// "NBDMAGIC", first word of the server greeting.
    public static let initMagic: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT", second word of the greeting and first word of every option.
    public static let optionMagic: UInt64 = 0x4948_4156_454F_5054
    /// First word of every option reply.
    public static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    public static let requestMagic: UInt32 = 0x2560_9513
    public static let simpleReplyMagic: UInt32 = 0x6744_6698
    public static let structuredReplyMagic: UInt32 = 0x668e_33ef

    /// Handshake flags sent by the server.
    public static let flagFixedNewstyle: UInt16 = 1 << 0
    public static let flagNoZeroes: UInt16 = 1 << 1
    /// Client flags.
    public static let clientFlagFixedNewstyle: UInt32 = 1 << 0
    public static let clientFlagNoZeroes: UInt32 = 1 << 1

    /// Bytes of a request header (magic, flags, type, cookie, offset, length).
    public static let requestHeaderSize = 28
    /// Bytes of an option header (magic, option, length).
    public static let optionHeaderSize = 16
    /// The spec's limit for every string (export names, descriptions, messages, context names).
    public static let maxStringLength = 4096
    /// Payloads up to this size must never be treated as abuse (spec, "Size constraints").
    public static let defaultMaxPayload: UInt32 = 32 << 20

    /// `base:allocation` flags.
    public static let stateHole: UInt32 = 1 << 0
    public static let stateZero: UInt32 = 1 << 1
    public static let baseAllocation = "base:allocation"
}

/// Option codes (`NBD_OPT_*`).
public enum NBDOption: UInt32, Sendable, CaseIterable {
    case exportName = 1
    case abort = 2
    case list = 3
    case peekExport = 4
    case startTLS = 5
    case info = 6
    case go = 7
    case structuredReply = 8
    case listMetaContext = 9
    case setMetaContext = 10
    case extendedHeaders = 11
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
public enum NBDOptionReply: UInt32, Sendable {
    case ack = 1
    case server = 2
    case info = 3
    case metaContext = 4
    case errUnsupported = 0x8000_0001
    case errPolicy = 0x8000_0002
    case errInvalid = 0x8000_0003
    case errPlatform = 0x8000_0004
    case errTLSRequired = 0x8000_0005
    case errUnknown = 0x8000_0006
    case errShutdown = 0x8000_0007
    case errBlockSizeRequired = 0x8000_0008
    case errTooBig = 0x8000_0009
}

/// Information items of `NBD_OPT_INFO`/`NBD_OPT_GO` (`NBD_INFO_*`).
public enum NBDInfo: UInt16, Sendable {
    case export = 0
    case name = 1
    case description = 2
    case blockSize = 3
}

/// Transmission flags (`NBD_FLAG_*`, 16 bits), sent with the export size.
public struct NBDTransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = NBDTransmissionFlags(rawValue: 1 << 8)
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)
}

/// Request commands (`NBD_CMD_*`).
public enum NBDCommand: UInt16, Sendable, CaseIterable {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
}

/// Command flags (`NBD_CMD_FLAG_*`, 16 bits).
public struct NBDCommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = NBDCommandFlags(rawValue: 1 << 0)
    public static let noHole = NBDCommandFlags(rawValue: 1 << 1)
    public static let dontFragment = NBDCommandFlags(rawValue: 1 << 2)
    public static let reqOne = NBDCommandFlags(rawValue: 1 << 3)
    public static let fastZero = NBDCommandFlags(rawValue: 1 << 4)
    /// Every flag this server knows.
    public static let known: NBDCommandFlags = [.fua, .noHole, .dontFragment, .reqOne, .fastZero]
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
public enum NBDReplyType: UInt16, Sendable {
    case none = 0
    case offsetData = 1
    case offsetHole = 2
    case blockStatus = 5
    case error = 0x8001
    case errorOffset = 0x8002
}

/// The error values allowed on the wire (`NBD_E*`): the spec restricts replies to these.
public enum NBDErrorCode: UInt32, Sendable, CustomStringConvertible {
    case EPERM = 1
    case EIO = 5
    case ENOMEM = 12
    case EINVAL = 22
    case ENOSPC = 28
    case EOVERFLOW = 75
    case ENOTSUP = 95
    case ESHUTDOWN = 108

    public var description: String {
        switch self {
        case .EPERM: return "EPERM"
        case .EIO: return "EIO"
        case .ENOMEM: return "ENOMEM"
        case .EINVAL: return "EINVAL"
        case .ENOSPC: return "ENOSPC"
        case .EOVERFLOW: return "EOVERFLOW"
        case .ENOTSUP: return "ENOTSUP"
        case .ESHUTDOWN: return "ESHUTDOWN"
        }
    }

    /// The NBD error for a system errno, as the spec and nbdkit map them: EROFS/EACCES -> EPERM,
    /// EDQUOT/EFBIG -> ENOSPC, EOPNOTSUPP -> ENOTSUP, anything unknown -> EIO.
    public init(errno e: Int32) {
        switch e {
        case Glibc.EPERM, EROFS, EACCES: self = .EPERM
        case Glibc.EIO: self = .EIO
        case Glibc.ENOMEM: self = .ENOMEM
        case Glibc.EINVAL: self = .EINVAL
        case Glibc.ENOSPC, EDQUOT, EFBIG: self = .ENOSPC
        case Glibc.EOVERFLOW: self = .EOVERFLOW
        case Glibc.ENOTSUP: self = .ENOTSUP  // == EOPNOTSUPP on Linux
        case Glibc.ESHUTDOWN: self = .ESHUTDOWN
        default: self = .EIO
        }
    }
}

/// The failure of one NBD request: the wire error and a message for the human at the client
/// (sent in structured error chunks, truncated to the spec's 4096-byte string limit).
public struct NBDError: Error, Sendable, Equatable, CustomStringConvertible {
    public var code: NBDErrorCode
    public var message: String

    public init(_ code: NBDErrorCode, _ message: String = "") {
        self.code = code
        self.message = message
    }

    public var description: String { message.isEmpty ? code.description : "\(code): \(message)" }

    public static func invalid(_ message: String) -> NBDError { NBDError(.EINVAL, message) }
    public static func io(_ message: String) -> NBDError { NBDError(.EIO, message) }
}
