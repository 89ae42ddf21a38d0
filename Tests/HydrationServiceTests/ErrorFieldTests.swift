import ControlProtocol
import HydrationEngine
import Testing

@testable import HydrationService

#if canImport(Glibc)
    import Glibc
#endif

/// Errors reach the wire with the fields they were thrown with: nothing is parsed out of message
/// text.
@Suite struct ErrorFieldTests {
    @Test func invalidParameterNamesTheParameterItWasThrownWith() {
        let e = HydrationError(.invalidParameter, "anything at all", parameter: "batch_size")
        #expect(DaemonControlHandler.varlinkError(e).string("parameter") == "batch_size")
        // A message that happens to start with a parameter's name does not name it.
        let m = HydrationError(.invalidParameter, "source-like words")
        #expect(DaemonControlHandler.varlinkError(m).string("parameter") == "parameters")
        let s = HydrationError(.invalidState, "job x is complete")
        #expect(DaemonControlHandler.varlinkError(s).string("parameter") == "name")
    }

    @Test func metadataExistsIsItsOwnErrorWithItsPath() {
        let e = HydrationError(.metadataExists, "metadata /m already exists", path: "/m", parameter: "metadata")
        let v = DaemonControlHandler.varlinkError(e)
        #expect(v.kind == .metadataExists && v.string("path") == "/m" && v.isRequestRejection)
        #expect(v.description == "metadata /m already exists")
    }

    @Test func metadataErrorsNameTheirFile() {
        let e = HydrationError.from(MetadataError(path: "/var/m", reason: .alreadyExists))
        #expect(e.code == .metadataExists && e.path == "/var/m" && e.parameter == "metadata")
        let v = DaemonControlHandler.varlinkError(HydrationError(.metadataMismatch, "not the device", path: "/var/m"))
        #expect(v.kind == .metadataCorrupt && v.string("path") == "/var/m")
        #expect(v.description.hasPrefix("metadata /var/m is corrupt"))
    }

    @Test func ioErrorCarriesItsPath() {
        let e = HydrationError(.ioError, "source: connect failed", errno: ECONNREFUSED, path: "nbd://h/x")
        let v = DaemonControlHandler.varlinkError(e)
        #expect(v.kind == .ioError && v.string("path") == "nbd://h/x")
    }

    /// The daemon reopens a job in the background when its remote source did not answer: decided
    /// by the error's parameter and errno, not by how its message begins.
    @Test func reopenDecisionReadsTheParameter() {
        let def = JobDefinition(
            name: "r", source: "nbd://host/x", dest: "/d", metadata: "/m", regionSize: 65536, discardSource: false,
            destZeroed: false, tunables: .defaults(regionSize: 65536), desired: .hydrating)
        let down = HydrationError(.ioError, "connecting: refused", errno: ECONNREFUSED, parameter: "source")
        #expect(JobManager.sourceUnreachable(def, down))
        let notSource = HydrationError(.ioError, "source-looking message", errno: ECONNREFUSED, parameter: "dest")
        #expect(!JobManager.sourceUnreachable(def, notSource))
    }
}
