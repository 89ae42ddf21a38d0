import ArgumentParser
import CloneCtlCore
import ControlProtocol
import FoundationEssentials

struct Apply: AsyncParsableCommand, DaemonCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make the daemon's jobs match a hydrationtab file (default /etc/hydrationtab).",
        discussion: """
            Each line 'NAME SOURCE DEST [METADATA|-] [OPTIONS|-]' (hydrationtab(5)) is one job: a missing job is \
            created, a paused one resumed (unless its line says no-hydration), one that matches is left alone. \
            A job is never removed, restarted or changed: a line that differs from its job is reported with the \
            options that differ. One line per job: 'NAME: created|resumed|unchanged|differs: ...|failed: ...|refused: ...'. \
            The whole file is checked before anything is applied. Exit 0 when every job matches or was created or \
            resumed; 65 when the file is invalid, a line differs from its job or the daemon refused one; 1 when a \
            declared job has failed (resume it with 'clonectl resume NAME' once its cause is fixed); 66 when the \
            file cannot be read. Applying the same file twice changes nothing the second time.
            """)

    @OptionGroup var daemon: DaemonOptions
    @ParentCommand var root: Clonectl

    @Argument(help: ArgumentHelp("The table (default /etc/hydrationtab).", valueName: "file"), completion: .file())
    var file: String = "/etc/hydrationtab"

    @Flag(help: "Report what would be done, and change nothing.")
    var dryRun = false

    @Option(
        help: ArgumentHelp(
            "Apply only the line of this job (the generator's units, one per job); an error if the file does not declare it.",
            valueName: "name"))
    var only: String?

    func run() async throws {
        guard let data = FileManager.default.contents(atPath: file) else {
            throw CloneFailure("cannot read \(file) (missing, or not readable)", exit: .noInput)
        }
        var entries: [Hydrationtab.Entry]
        do {
            entries = try Hydrationtab.parse(String(decoding: data, as: UTF8.self), file: file)
        } catch {
            throw CloneFailure(error.description, exit: .rejected)
        }
        if let only {
            entries = entries.filter { $0.name == only }
            if entries.isEmpty { throw CloneFailure("\(file) declares no job named '\(only)'", exit: .rejected) }
        }
        let jobs = try call { try $0.getStatus() }
        let byName = Dictionary(jobs.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        var worst = CloneExit.success
        func note(_ e: CloneExit) { if e == .rejected || worst == .success { worst = e } }
        for entry in entries {
            let outcome: String
            if let job = byName[entry.name] {
                let diffs = Hydrationtab.differences(entry, job)
                if !diffs.isEmpty {
                    outcome = "differs: " + diffs.joined(separator: ", ")
                    note(.rejected)
                } else if job.state == .failed {
                    let why = job.error.map { "\($0.code): \($0.message)" } ?? "failed"
                    outcome = "failed: \(why) (not resumed: 'clonectl resume \(entry.name)' once the cause is fixed)"
                    note(.jobFailed)
                } else if job.state == .paused && !entry.options.noHydration {
                    if dryRun {
                        outcome = "would resume"
                    } else {
                        do {
                            _ = try call { try $0.resume(entry.name) }
                            outcome = "resumed"
                        } catch {
                            outcome = "refused: \(error.message)"
                            note(.rejected)
                        }
                    }
                } else {
                    outcome = "unchanged"
                }
            } else if dryRun {
                outcome = "would create"
            } else {
                do {
                    _ = try call { try $0.start(Hydrationtab.startParameters(entry)) }
                    outcome = "created"
                } catch {
                    outcome = "refused: \(error.message)"
                    note(.rejected)
                }
            }
            Output.line("\(entry.name): \(outcome)")
        }
        if worst != .success {
            Output.fail(CloneFailure("\(file): not every declared job matches (see above)", exit: worst))
        }
    }
}
