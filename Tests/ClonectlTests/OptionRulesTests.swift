import Testing

@testable import CloneCtlCore

/// Options that only apply with others are refused, not silently dropped (issue 14).
@Suite struct OptionRulesTests {
    func start(source: Bool = true, dest: Bool = true, _ options: [String] = [], discard: Bool = false) -> String? {
        OptionRules.startProblem(
            name: "vm1", hasSource: source, hasDest: dest, creationOptions: options,
            discardSource: discard, spaceBudget: options.contains("--space-budget"))
    }

    @Test func spaceBudgetNeedsDiscardSource() throws {
        let problem = try #require(start(["--space-budget"]))
        #expect(problem.hasPrefix("--space-budget applies only with --discard-source"))
        #expect(problem.contains("add --discard-source"))
        #expect(start(["--space-budget", "--discard-source"], discard: true) == nil)
    }

    @Test func hydrateOnReadNeedsExport() throws {
        let problem = try #require(
            OptionRules.startProblem(
                name: "vm1", hasSource: true, hasDest: true, creationOptions: ["--hydrate-on-read"],
                discardSource: false, spaceBudget: false, export: false, hydrateOnRead: true))
        #expect(problem.hasPrefix("--hydrate-on-read applies only with --export"))
        #expect(
            OptionRules.startProblem(
                name: "vm1", hasSource: true, hasDest: true, creationOptions: ["--export", "--hydrate-on-read"],
                discardSource: false, spaceBudget: false, export: true, hydrateOnRead: true) == nil)
    }

    @Test func aCompleteCreationIsAccepted() {
        #expect(start() == nil)
        #expect(start(["--threshold", "--rate-limit", "--dest-zeroed", "--no-hydration"]) == nil)
        #expect(start(source: false, dest: false) == nil, "start NAME alone resumes")
    }

    @Test func creationOptionsWithoutSourceAndDestAreNamed() throws {
        let one = try #require(start(source: false, dest: false, ["--threshold"]))
        #expect(one.hasPrefix("--threshold applies only when creating a job, which needs both --source and --dest"))
        #expect(one.contains("'clonectl start vm1' alone resumes an existing job"))
        #expect(one.contains("clonectl set vm1 --threshold ..."))

        let two = try #require(start(source: false, dest: false, ["--no-hydration", "--rate-limit"]))
        #expect(two.hasPrefix("--no-hydration, --rate-limit apply only when creating a job"))
        #expect(two.contains("clonectl set vm1 --rate-limit ...") && !two.contains("set vm1 --no-hydration"))

        let flagOnly = try #require(start(source: false, dest: false, ["--discard-source"]))
        #expect(!flagOnly.contains("clonectl set"), "--discard-source cannot be set later")
    }

    @Test(arguments: [(true, "--dest"), (false, "--source")])
    func halfACreationNamesWhatIsMissing(_ hasSource: Bool, _ missing: String) throws {
        let problem = try #require(start(source: hasSource, dest: !hasSource))
        #expect(problem.contains("needs both --source and --dest (missing \(missing))"))
    }

    @Test func waitTimeoutMustBePositive() throws {
        #expect(OptionRules.waitProblem(timeoutMs: nil) == nil)
        #expect(OptionRules.waitProblem(timeoutMs: 1) == nil)
        let problem = try #require(OptionRules.waitProblem(timeoutMs: 0))
        #expect(problem.hasPrefix("--timeout must be longer than 0"))
    }

    @Test func offlineCommandsRefuseASocket() throws {
        #expect(OptionRules.offlineProblem(command: "check", socket: nil) == nil)
        let problem = try #require(OptionRules.offlineProblem(command: "dump", socket: "/run/x.sock"))
        #expect(problem.hasPrefix("--socket does not apply to 'dump'"))
    }
}
