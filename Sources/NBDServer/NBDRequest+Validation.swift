/// What a request is checked against: the negotiated session.
public struct NBDTransmissionContext: Sendable, Equatable {
    public var size: UInt64
    public var flags: NBDTransmissionFlags
    public var structuredReplies: Bool
    /// Number of meta contexts selected for this export.
    public var metaContextCount: Int
    public var minimumBlock: UInt32
    /// Largest read or write payload accepted.
    public var maxPayload: UInt32

    public init(
        size: UInt64, flags: NBDTransmissionFlags, structuredReplies: Bool, metaContextCount: Int,
        minimumBlock: UInt32 = 1, maxPayload: UInt32 = NBDProtocol.defaultMaxPayload
    ) {
        self.size = size
        self.flags = flags
        self.structuredReplies = structuredReplies
        self.metaContextCount = metaContextCount
        self.minimumBlock = max(1, minimumBlock)
        self.maxPayload = maxPayload
    }
}

extension NBDRequest {
    /// nil when the request may be executed, otherwise the error to reply (spec "Error values",
    /// in the order nbdkit's `validate_request` checks them): writes on a read-only export EPERM;
    /// unknown commands EINVAL; out of range or zero length EINVAL, or ENOSPC for WRITE and
    /// WRITE_ZEROES; unknown or inapplicable or not negotiated flags EINVAL; a READ over the maximum
    /// payload EOVERFLOW with structured replies (EINVAL without), a WRITE over it EINVAL;
    /// commands not advertised EINVAL; BLOCK_STATUS without a selected context EINVAL; requests
    /// not aligned to the minimum block size EINVAL.
    public func validate(in ctx: NBDTransmissionContext) -> NBDError? {
        guard let command else { return .invalid("unknown command \(type)") }
        let writes = command == .write || command == .trim || command == .writeZeroes
        if writes && ctx.flags.contains(.readOnly) {
            return NBDError(.EPERM, "\(command) on a read-only export")
        }
        switch command {
        case .read, .write, .trim, .cache, .writeZeroes, .blockStatus:
            // nbdkit counts a zero length as out of range too (so a zero-length write is ENOSPC).
            let (end, overflow) = offset.addingReportingOverflow(UInt64(length))
            if length == 0 || overflow || end > ctx.size {
                let message =
                    length == 0
                    ? "\(command) of length 0"
                    : "\(command) at offset \(offset) length \(length) is beyond the end of the export (\(ctx.size) bytes)"
                return NBDError(command == .write || command == .writeZeroes ? .ENOSPC : .EINVAL, message)
            }
        case .flush:
            if offset != 0 || length != 0 { return .invalid("flush needs offset and length 0") }
        case .disconnect:
            break
        }
        let unknown = flags.subtracting(.known)
        if !unknown.isEmpty { return .invalid("unknown flags 0x\(String(unknown.rawValue, radix: 16))") }
        if flags.contains(.noHole) && command != .writeZeroes {
            return .invalid("NO_HOLE is only valid with WRITE_ZEROES")
        }
        if flags.contains(.fastZero) {
            if command != .writeZeroes { return .invalid("FAST_ZERO is only valid with WRITE_ZEROES") }
            if !ctx.flags.contains(.sendFastZero) { return .invalid("FAST_ZERO was not negotiated") }
        }
        if flags.contains(.dontFragment) {
            if command != .read { return .invalid("DF is only valid with READ") }
            if !ctx.structuredReplies || !ctx.flags.contains(.sendDF) { return .invalid("DF was not negotiated") }
        }
        if flags.contains(.reqOne) && command != .blockStatus {
            return .invalid("REQ_ONE is only valid with BLOCK_STATUS")
        }
        if flags.contains(.fua) && !ctx.flags.contains(.sendFUA) { return .invalid("FUA was not negotiated") }
        if command == .read && length > ctx.maxPayload {
            return NBDError(
                ctx.structuredReplies ? .EOVERFLOW : .EINVAL,
                "read of \(length) bytes exceeds the maximum payload of \(ctx.maxPayload)")
        }
        if command == .write && length > ctx.maxPayload {
            return .invalid("write of \(length) bytes exceeds the maximum payload of \(ctx.maxPayload)")
        }
        switch command {
        case .flush where !ctx.flags.contains(.sendFlush): return .invalid("flush is not supported")
        case .trim where !ctx.flags.contains(.sendTrim): return .invalid("trim is not supported")
        case .writeZeroes where !ctx.flags.contains(.sendWriteZeroes): return .invalid("write zeroes is not supported")
        case .cache where !ctx.flags.contains(.sendCache): return .invalid("cache is not supported")
        case .blockStatus where !ctx.structuredReplies || ctx.metaContextCount == 0:
            return .invalid("block status needs structured replies and a selected meta context")
        default: break
        }
        if ctx.minimumBlock > 1, command != .flush, command != .disconnect,
            offset % UInt64(ctx.minimumBlock) != 0 || length % ctx.minimumBlock != 0
        {
            // The end of an export whose size is not a multiple of the block size stays reachable.
            let end = offset + UInt64(length)
            if offset % UInt64(ctx.minimumBlock) != 0 || end != ctx.size {
                return .invalid(
                    "\(command) at offset \(offset) length \(length) is not aligned to \(ctx.minimumBlock) bytes")
            }
        }
        return nil
    }
}
