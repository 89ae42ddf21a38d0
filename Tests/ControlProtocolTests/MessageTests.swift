import ControlProtocol
import Foundation
import Testing

private func json<T: Encodable>(_ v: T) throws -> [String: Any] {
    let data = try VarlinkJSON.makeEncoder().encode(v)
    return try JSONSerialization.jsonObject(with: data) as! [String: Any]
}

private func roundTrip<T: Codable & Equatable>(_ v: T) throws -> T {
    try VarlinkJSON.makeDecoder().decode(T.self, from: VarlinkJSON.makeEncoder().encode(v))
}

@Suite struct EnvelopeTests {
    @Test func callOmitsFalseFlagsAndRoundTrips() throws {
        let plain = VarlinkCall(method: "org.hydrationd.Control.List", parameters: .emptyObject)
        #expect(Set(try json(plain).keys) == ["method", "parameters"])
        let more = try VarlinkCall(
            method: "org.hydrationd.Control.GetStatus", encoding: GetStatusParameters(name: "a"), more: true)
        let j = try json(more)
        #expect(j["more"] as? Bool == true)
        #expect(j["oneway"] == nil)
        #expect((j["parameters"] as? [String: Any])?["name"] as? String == "a")
        #expect(try roundTrip(more) == more)
        #expect(more.interfaceName == "org.hydrationd.Control")
        #expect(more.memberName == "GetStatus")
    }

    @Test func callDecodesFlagsAsSentByOtherClients() throws {
        let text = #"{"method":"org.hydrationd.Control.Pause","parameters":{"name":"x"},"oneway":true,"more":false}"#
        let call = try VarlinkFraming.decodeCall(Array(text.utf8))
        #expect(call.isOneway)
        #expect(!call.wantsMore)
        #expect(call.parameters == ["name": "x"])
        #expect(throws: DecodingError.self) { try VarlinkFraming.decodeCall(Array(#"{"parameters":{}}"#.utf8)) }
        #expect(throws: DecodingError.self) {
            try VarlinkFraming.decodeCall(Array(#"{"method":"a.B","more":"yes"}"#.utf8))
        }
        #expect(throws: (any Error).self) { try VarlinkFraming.decodeCall(Array("{not json".utf8)) }
    }

    @Test func replyWithContinuesAndError() throws {
        let r = try VarlinkReply(encoding: GetStatusReply(jobs: [sampleStatus()]), continues: true)
        let j = try json(r)
        #expect(j["continues"] as? Bool == true)
        #expect(j["error"] == nil)
        #expect(try roundTrip(r) == r)

        let e = VarlinkReply(error: .noSuchJob("vm9"))
        let ej = try json(e)
        #expect(ej["error"] as? String == "org.hydrationd.Control.NoSuchJob")
        #expect((ej["parameters"] as? [String: Any])?["name"] as? String == "vm9")
        #expect(ej["continues"] == nil)
        #expect(try roundTrip(e).varlinkError == .noSuchJob("vm9"))
    }

    @Test func decodeParametersThrowsTheReplysError() throws {
        let e = VarlinkReply(error: .deviceInUse(path: "/dev/sdb", job: "other"))
        #expect(throws: VarlinkError.deviceInUse(path: "/dev/sdb", job: "other")) {
            try e.decodeParameters(GetStatusReply.self)
        }
        // Replies without parameters decode as an empty object.
        let empty = try VarlinkFraming.decodeReply(Array("{}".utf8))
        #expect(try empty.decodeParameters(EmptyReply.self) == EmptyReply())
    }

    @Test func jsonValueKeepsLargeIntegersExact() throws {
        let v = try JSONValue(encoding: ["big": UInt64.max, "neg": UInt64(1) << 62])
        #expect(v["big"] == .uint(UInt64.max))
        #expect(v["neg"] == .int(Int64(1) << 62))
        struct Big: Codable, Equatable { var big: UInt64 }
        #expect(try JSONValue.object(["big": .uint(UInt64.max)]).decode(Big.self) == Big(big: .max))
    }
}

@Suite struct ParameterTypeTests {
    @Test func startParametersUseSnakeCaseAndOmitNils() throws {
        let p = StartParameters(
            name: "vm1", source: "/src.img", dest: "/dev/sdb", metadata: "/m", regionSize: 65536,
            discardSource: true, destZeroed: false, noHydration: true, threshold: 2, batchSize: 4,
            commitIntervalMs: 500, spaceBudgetBytes: 1 << 30, rateLimitBytesPerSecond: 1 << 20, export: true,
            hydrateOnRead: true, io: "direct", verify: true)
        let keys = Set(try json(p).keys)
        #expect(
            keys == [
                "name", "source", "dest", "metadata", "region_size", "discard_source", "dest_zeroed", "no_hydration",
                "threshold", "batch_size", "commit_interval_ms", "space_budget_bytes", "rate_limit_bytes_per_second",
                "export", "hydrate_on_read", "io", "verify",
            ])
        #expect(keys == StartParameters.parameterNames)
        #expect(try roundTrip(p) == p)
        #expect(!p.isResumeOnly)
        let resume = StartParameters(name: "vm1")
        #expect(Set(try json(resume).keys) == ["name"])
        #expect(resume.isResumeOnly)
        #expect(!StartParameters(name: "vm1", export: true).isResumeOnly)
        #expect(!StartParameters(name: "vm1", verify: true).isResumeOnly)
    }

    @Test func spaceBudgetWithoutDiscardSourceIsInapplicable() {
        let withoutDiscard = StartParameters(name: "vm1", source: "/s", dest: "/d", spaceBudgetBytes: 8 << 20)
        #expect(withoutDiscard.inapplicableParameter?.name == "space_budget_bytes")
        #expect(withoutDiscard.inapplicableParameter?.reason.contains("discard_source") == true)
        var explicitFalse = withoutDiscard
        explicitFalse.discardSource = false
        #expect(explicitFalse.inapplicableParameter?.name == "space_budget_bytes")
        var withDiscard = withoutDiscard
        withDiscard.discardSource = true
        #expect(withDiscard.inapplicableParameter == nil)
        #expect(StartParameters(name: "vm1", source: "/s", dest: "/d").inapplicableParameter == nil)
    }

    @Test func setRemoveStatusCheckParameters() throws {
        let s = SetParameters(
            name: "a", threshold: 1, batchSize: 2, rateLimitBytesPerSecond: 3, spaceBudgetBytes: 4, commitIntervalMs: 5)
        #expect(Set(try json(s).keys) == SetParameters.parameterNames)
        #expect(
            SetParameters.parameterNames == [
                "name", "threshold", "batch_size", "rate_limit_bytes_per_second", "space_budget_bytes",
                "commit_interval_ms",
            ])
        #expect(try roundTrip(s) == s)
        #expect(try roundTrip(RemoveParameters(name: "a", force: true)) == RemoveParameters(name: "a", force: true))
        #expect(RemoveParameters.parameterNames == ["name", "force"])
        #expect(try roundTrip(GetStatusParameters()) == GetStatusParameters())
        #expect(try json(GetStatusParameters()).isEmpty)
        #expect(GetStatusParameters.parameterNames == ["name"])
        #expect(try roundTrip(CheckMetadataParameters(path: "/m")) == CheckMetadataParameters(path: "/m"))
        #expect(JobNameParameters.parameterNames == ["name"])
        #expect(EmptyParameters.parameterNames.isEmpty)
        #expect(GetInterfaceDescriptionParameters.parameterNames == ["interface"])
    }

    @Test func repliesRoundTrip() throws {
        let st = sampleStatus()
        #expect(try roundTrip(StartReply(job: st, created: true)) == StartReply(job: st, created: true))
        #expect(try roundTrip(JobReply(job: st)) == JobReply(job: st))
        #expect(try roundTrip(GetStatusReply(jobs: [st, sampleStatus(name: "b", state: .paused)])).jobs.count == 2)
        let summary = JobSummary(st)
        #expect(
            Set(try json(summary).keys) == [
                "name", "state", "source_path", "dest_path", "regions_total", "regions_hydrated", "discard_enabled",
            ])
        #expect(try roundTrip(ListReply(jobs: [summary])) == ListReply(jobs: [summary]))
        let report = MetadataReport(
            path: "/m", valid: false, version: 1, generation: 7, jobId: "j", regionSize: 4096, targetSizeBytes: 8192,
            regionsTotal: 2, regionsHydrated: 1, discardSource: true, destZeroed: false, complete: false,
            sourcePath: "/s", destPath: "/d", createdUnixMs: 1, committedUnixMs: 2, problems: ["page 3: bad CRC"])
        #expect(try roundTrip(CheckMetadataReply(report: report)) == CheckMetadataReply(report: report))
        let info = VarlinkServiceInfo(vendor: "v", product: "p", version: "1", url: "u", interfaces: ["a", "b"])
        #expect(try roundTrip(info) == info)
        #expect(try roundTrip(GetInterfaceDescriptionReply(description: "x")).description == "x")
        #expect(try json(EmptyReply()).isEmpty)
    }

    @Test func jobStatusWireNamesAndExplicitNulls() throws {
        let j = try json(sampleStatus())
        #expect(
            Set(j.keys) == [
                "version", "name", "state", "source", "dest", "region_size", "regions", "bytes",
                "throughput_bytes_per_second", "eta_seconds", "commits", "discard", "space_budget_bytes",
                "settings", "metadata", "error", "export", "verify",
            ])
        #expect(j["eta_seconds"] is NSNull)
        #expect(j["export"] is NSNull)
        var exported = sampleStatus()
        exported.export = .init(uri: "nbd+unix:///vm1?socket=/run/hydrationd/nbd.sock", clients: 2)
        let e = try json(exported)["export"] as? [String: Any]
        #expect(e?["uri"] as? String == "nbd+unix:///vm1?socket=/run/hydrationd/nbd.sock")
        #expect(e?["clients"] as? Int == 2)
        #expect(try roundTrip(exported) == exported)
        #expect(j["error"] is NSNull)
        #expect(j["version"] as? Int == JobStatus.schemaVersion)
    }

    @Test func statusUpdateIsFinalWhenAllJobsEnded() {
        #expect(!StatusUpdate(jobs: [sampleStatus(state: .hydrating)]).isFinal)
        #expect(StatusUpdate(jobs: [sampleStatus(state: .complete), sampleStatus(name: "b", state: .failed)]).isFinal)
        #expect(!StatusUpdate(jobs: [sampleStatus(state: .complete), sampleStatus(name: "b", state: .paused)]).isFinal)
    }

    @Test func readOnlyMethodClassification() {
        let readOnly = Set(ControlMethod.allCases.filter(\.isReadOnly).map(\.rawValue))
        #expect(readOnly == ["GetStatus", "List", "CheckMetadata"])
        #expect(ControlMethod.start.qualifiedName == "org.hydrationd.Control.Start")
    }
}

@Suite struct ErrorTests {
    @Test(
        arguments: [
            (VarlinkError.noSuchJob("a"), "org.hydrationd.Control.NoSuchJob", ["name"]),
            (.jobExists("a"), "org.hydrationd.Control.JobExists", ["name"]),
            (.jobRunning("a", state: .hydrating), "org.hydrationd.Control.JobRunning", ["name", "state"]),
            (
                .invalidParameter("region_size", reason: "not a power of two"),
                "org.hydrationd.Control.InvalidParameter", ["parameter", "reason"]
            ),
            (.deviceInUse(path: "/dev/x", job: "b"), "org.hydrationd.Control.DeviceInUse", ["path", "job", "message"]),
            (
                .sizeMismatch(sourceBytes: 2, destBytes: 1), "org.hydrationd.Control.SizeMismatch",
                ["source_bytes", "dest_bytes", "message"]
            ),
            (
                .metadataCorrupt(path: "/m", reason: "crc"), "org.hydrationd.Control.MetadataCorrupt",
                ["path", "reason"]
            ),
            (
                .permissionDenied(method: "m", reason: "r"), "org.hydrationd.Control.PermissionDenied",
                ["method", "reason"]
            ),
            (
                .jobFailed("a", code: "NoSpace", message: "m"), "org.hydrationd.Control.JobFailed",
                ["name", "code", "message"]
            ),
            (
                .ioError(path: nil, errno: 5, message: "EIO"), "org.hydrationd.Control.IOError",
                ["path", "errno", "message"]
            ),
            (.invalidMessage("bad"), "org.hydrationd.Control.InvalidMessage", ["reason"]),
            (.messageTooLarge(limit: 1), "org.hydrationd.Control.MessageTooLarge", ["limit"]),
            (.tooManyConnections(limit: 1), "org.hydrationd.Control.TooManyConnections", ["limit"]),
            (.internalError("x"), "org.hydrationd.Control.InternalError", ["message"]),
            (.dataAtRisk("a", message: "m"), "org.hydrationd.Control.DataAtRisk", ["name", "message"]),
            (
                .deviceUnconfirmed(path: "/dev/x", message: "m"), "org.hydrationd.Control.DeviceUnconfirmed",
                ["path", "message"]
            ),
            (
                .exportInUse("a", clients: 2, message: "m"), "org.hydrationd.Control.ExportInUse",
                ["name", "clients", "message"]
            ),
            (
                .jobRecordUnreadable("a", path: "/s/jobs/a.json", message: "m"),
                "org.hydrationd.Control.JobRecordUnreadable", ["name", "path", "message"]
            ),
            (.interfaceNotFound("i"), "org.varlink.service.InterfaceNotFound", ["interface"]),
            (.methodNotFound("m"), "org.varlink.service.MethodNotFound", ["method"]),
            (.methodNotImplemented("m"), "org.varlink.service.MethodNotImplemented", ["method"]),
            (.serviceInvalidParameter("p"), "org.varlink.service.InvalidParameter", ["parameter"]),
            (.expectedMore, "org.varlink.service.ExpectedMore", []),
        ] as [(VarlinkError, String, [String])])
    func errorNamesAndParametersMatchTheInterface(error: VarlinkError, name: String, params: [String]) throws {
        #expect(error.name == name)
        #expect(Set(error.parameters.keys) == Set(params))
        #expect(error.kind != .other)
        #expect(!error.description.isEmpty)
        // The parameters are those the interface text declares for the error.
        let iface =
            name.hasPrefix("org.varlink.service.") ? ControlInterface.serviceDescription : ControlInterface.description
        let decl = IDLDeclarations(iface)
        let short = String(name.split(separator: ".").last!)
        #expect(decl.errors[short].map(Set.init) == Set(params), "\(name)")
        // And they survive a reply round trip.
        let reply = try VarlinkFraming.decodeReply(try VarlinkFraming.encode(VarlinkReply(error: error)).dropLast())
        #expect(reply.varlinkError == error)
    }

    @Test func everyDeclaredErrorHasAConstructor() {
        let declared = Set(IDLDeclarations(ControlInterface.description).errors.keys)
        #expect(
            declared == [
                "NoSuchJob", "JobExists", "JobRunning", "InvalidParameter", "DeviceInUse", "SizeMismatch",
                "MetadataCorrupt", "PermissionDenied", "JobFailed", "IOError", "InvalidMessage", "MessageTooLarge",
                "TooManyConnections", "InternalError", "DataAtRisk", "DeviceUnconfirmed", "ExportInUse",
                "JobRecordUnreadable", "MetadataExists",
            ])
    }

    @Test func rejectionClassificationAndUnknownNames() {
        #expect(VarlinkError.noSuchJob("a").isRequestRejection)
        #expect(VarlinkError.serviceInvalidParameter("a").isRequestRejection)
        #expect(!VarlinkError.internalError("a").isRequestRejection)
        #expect(!VarlinkError.jobFailed("a", code: "c", message: "m").isRequestRejection)
        #expect(VarlinkError.exportInUse("a", clients: 1, message: "m").isRequestRejection)
        #expect(VarlinkError.exportInUse("a", clients: 2, message: "m").description.contains("2 clients"))
        let other = VarlinkError(name: "com.example.Weird", parameters: ["x": 1])
        #expect(other.kind == .other)
        #expect(other.description.contains("com.example.Weird"))
        #expect(VarlinkError.noSuchJob("vm1").description == "no job named 'vm1'")
    }
}

@Suite struct InterfaceDefinitionTests {
    let decl = IDLDeclarations(ControlInterface.description)

    @Test func jobStatusTypeMirrorsTheSwiftType() throws {
        #expect(decl.interfaceName == "org.hydrationd.Control")
        let j = try json(sampleStatus())
        #expect(Set(decl.types["JobStatus"] ?? []) == Set(j.keys))
        let nested: [(String, String)] = [
            ("source", "JobSource"), ("dest", "JobDest"), ("regions", "JobRegions"), ("bytes", "JobBytes"),
            ("commits", "JobCommits"), ("discard", "JobDiscard"), ("settings", "JobSettings"),
            ("metadata", "JobMetadata"),
        ]
        for (key, type) in nested {
            let obj = j[key] as? [String: Any]
            #expect(obj.map { Set($0.keys) } == Set(decl.types[type] ?? []), "\(type)")
        }
        var failed = sampleStatus(state: .failed)
        failed.error = .init(code: "NoSpace", message: "m")
        #expect(
            Set((try json(failed)["error"] as? [String: Any])?.keys ?? [:].keys) == Set(decl.types["JobError"] ?? []))
        var exported = sampleStatus()
        exported.export = .init(
            uri: "nbd+unix:///a?socket=/s", clients: 0,
            io: .init(readBytes: 1, writtenBytes: 2, trimmedBytes: 3, hydratedRegions: 4))
        #expect(
            Set((try json(exported)["export"] as? [String: Any])?.keys ?? [:].keys)
                == Set(decl.types["JobExport"] ?? []))
        #expect(
            Set(((try json(exported)["export"] as? [String: Any])?["io"] as? [String: Any])?.keys ?? [:].keys)
                == Set(decl.types["JobExportIO"] ?? []))
        var verified = sampleStatus()
        verified.verify = .init(enabled: true, verifiedBytes: 1, mismatches: 0, readBack: "direct")
        #expect(
            Set((try json(verified)["verify"] as? [String: Any])?.keys ?? [:].keys)
                == Set(decl.types["JobVerify"] ?? []))
        #expect(Set(decl.types["JobSummary"] ?? []) == Set(try json(JobSummary(sampleStatus())).keys))
        let report = MetadataReport(
            path: "/m", valid: true, version: 1, generation: 1, jobId: "j", regionSize: 1, targetSizeBytes: 1,
            regionsTotal: 1, regionsHydrated: 1, discardSource: true, destZeroed: true, complete: true,
            sourcePath: "/s", destPath: "/d", createdUnixMs: 1, committedUnixMs: 1, problems: [])
        #expect(Set(decl.types["MetadataReport"] ?? []) == Set(try json(report).keys))
    }

    @Test func enumsMatch() {
        let text = ControlInterface.description
        let states = JobStatus.State.allCases.map(\.rawValue).joined(separator: ", ")
        #expect(text.contains("state: (\(states))"))
        #expect(text.contains("mode: (rw, ro, fail)"))
    }

    @Test func methodsMatchParameterTypes() throws {
        #expect(Set(decl.methodInputs.keys) == Set(ControlMethod.allCases.map(\.rawValue)))
        let inputs: [ControlMethod: Set<String>] = [
            .start: StartParameters.parameterNames, .pause: PauseParameters.parameterNames,
            .resume: ResumeParameters.parameterNames, .getStatus: GetStatusParameters.parameterNames,
            .list: ListParameters.parameterNames, .set: SetParameters.parameterNames,
            .commit: CommitParameters.parameterNames, .remove: RemoveParameters.parameterNames,
            .checkMetadata: CheckMetadataParameters.parameterNames,
        ]
        for (m, names) in inputs { #expect(Set(decl.methodInputs[m.rawValue] ?? ["?"]) == names, "\(m)") }
        let st = sampleStatus()
        let outputs: [ControlMethod: Set<String>] = [
            .start: Set(try json(StartReply(job: st, created: true)).keys),
            .pause: Set(try json(JobReply(job: st)).keys),
            .getStatus: Set(try json(GetStatusReply(jobs: [])).keys),
            .list: Set(try json(ListReply(jobs: [])).keys),
            .remove: Set(try json(RemoveReply(keptMetadata: "/m")).keys),
            .checkMetadata: Set(try json(CheckMetadataReply(report: MetadataReport(path: "/", valid: true))).keys),
        ]
        for (m, names) in outputs { #expect(Set(decl.methodOutputs[m.rawValue] ?? ["?"]) == names, "\(m)") }
    }

    @Test func serviceInterfaceDeclaresGetInfo() {
        let s = IDLDeclarations(ControlInterface.serviceDescription)
        #expect(s.interfaceName == "org.varlink.service")
        #expect(Set(s.methodOutputs["GetInfo"] ?? []) == ["vendor", "product", "version", "url", "interfaces"])
        #expect(s.methodInputs["GetInterfaceDescription"] == ["interface"])
        #expect(ControlInterface.descriptions.count == 2)
    }

    /// The independent Python implementation must parse both interface texts.
    @Test(
        .enabled(if: pythonHasVarlink(), "python3's varlink module is not installed (python3 -m pip install varlink)"))
    func pythonVarlinkParsesTheInterfaces() throws {
        for text in [ControlInterface.description, ControlInterface.serviceDescription] {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = [
                "python3", "-c",
                "import sys, varlink; i = varlink.Interface(sys.stdin.read()); print(i.name, len(i.members))",
            ]
            let input = Pipe(), output = Pipe(), err = Pipe()
            p.standardInput = input; p.standardOutput = output; p.standardError = err
            try p.run()
            input.fileHandleForWriting.write(Data(text.utf8))
            try input.fileHandleForWriting.close()
            p.waitUntilExit()
            let out = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            let errText = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            #expect(p.terminationStatus == 0, "python varlink rejected the interface: \(errText)")
            #expect(out.hasPrefix("org."))
        }
    }
}

func pythonHasVarlink() -> Bool {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = ["python3", "-c", "import varlink"]
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    guard (try? p.run()) != nil else { return false }
    p.waitUntilExit()
    return p.terminationStatus == 0
}

@Suite struct ClientErrorTests {
    @Test func unreachableSocketSaysWhereAndWhatToDo() throws {
        let path = "/tmp/hydrationd-no-such-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        let error = #expect(throws: VarlinkClientError.self) { _ = try VarlinkClient(socketPath: path) }
        #expect(error == .unreachable(path: path, errno: ENOENT))
        #expect(error?.description.contains(path) == true)
        #expect(error?.description.contains("Is the daemon running?") == true)
    }

    @Test func tooLongPathIsRejected() {
        let path = "/tmp/" + String(repeating: "x", count: 200)
        #expect(throws: VarlinkClientError.pathTooLong(path: path)) { try VarlinkClient(socketPath: path) }
    }
}

@Suite struct DocumentationTests {
    /// docs/control-protocol.md carries the interface text the daemon serves.
    @Test func docsCarryTheInterfaceText() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        let doc = try String(contentsOf: root.appendingPathComponent("docs/control-protocol.md"), encoding: .utf8)
        #expect(doc.contains("```varlink\n" + ControlInterface.description + "\n```"))
        for field in [
            "throughput_bytes_per_second", "eta_seconds", "skipped_zero", "pending_bytes", "last_duration_ms",
        ] {
            #expect(doc.contains(field))
        }
    }
}
