/// Why a device was refused: not the one a job was created for, not confirmable, sharing bytes
/// with another of the job's, held by something else, or not readable to tell. The engine turns it
/// into its own error with the same fields (`HydrationError.from`).
package struct IdentityError: Error, Sendable, Equatable, CustomStringConvertible {
    package enum Kind: Sendable, Equatable {
        /// Another kind or size of device, or another file, than the metadata records.
        case mismatch
        /// The device cannot be confirmed to be the job's own (its stable ID differs, or there is none).
        case unconfirmed
        /// Two of the job's paths name the same bytes.
        case sameDevice
        /// Something else holds the device (`holder`).
        case inUse
        /// Reading what the identity needed failed (`errno`).
        case io
    }

    package var kind: Kind
    package var message: String
    /// The file or device concerned.
    package var path: String?
    /// The request parameter concerned: `source`, `dest` or `metadata`.
    package var parameter: String?
    package var errno: Int32?
    /// For `inUse`: what holds the device.
    package var holder: String?

    package init(
        _ kind: Kind, _ message: String, path: String? = nil, parameter: String? = nil, errno: Int32? = nil,
        holder: String? = nil
    ) {
        self.kind = kind; self.message = message; self.path = path; self.parameter = parameter
        self.errno = errno; self.holder = holder
    }

    package var description: String { message }
}

/// The three paths of a job, as messages name them and as the request names them.
package enum DeviceRole: String, Sendable, CaseIterable {
    case source, destination, metadata

    /// The request parameter: `source`, `dest`, `metadata`.
    package var parameter: String { self == .destination ? "dest" : rawValue }

    /// The role a message label names (`source`, `destination`/`dest`, `metadata`).
    package init?(label: String) {
        switch label {
        case "source": self = .source
        case "destination", "dest": self = .destination
        case "metadata": self = .metadata
        default: return nil
        }
    }
}
