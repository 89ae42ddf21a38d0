/// Options that take effect only together with others. clonectl refuses a command line where one
/// would be silently ignored (a usage error, exit 64) and says why; the daemon refuses the same
/// requests with `InvalidParameter` (`StartParameters.inapplicableParameter`, `Set`).
public enum OptionRules {
    /// `clonectl start NAME ...`. `creationOptions` are the options given besides `--source`,
    /// `--dest` and `--json`, spelled as on the command line (`--threshold`); they all create a job.
    public static func startProblem(
        name: String, hasSource: Bool, hasDest: Bool, creationOptions: [String], discardSource: Bool, spaceBudget: Bool,
        export: Bool = false, hydrateOnRead: Bool = false
    ) -> String? {
        if !hasSource && !hasDest && !creationOptions.isEmpty {
            let opts = creationOptions.joined(separator: ", ")
            let verb = creationOptions.count == 1 ? "applies" : "apply"
            let tunables = creationOptions.filter { tunableOptions.contains($0) }
            let hint =
                tunables.isEmpty
                ? ""
                : "; to change the tunables of an existing job use 'clonectl set \(name) \(tunables.map { $0 + " ..." }.joined(separator: " "))'"
            return "\(opts) \(verb) only when creating a job, which needs both --source and --dest "
                + "('clonectl start \(name)' alone resumes an existing job as it is)\(hint)"
        }
        if hasSource != hasDest {
            return "creating a job needs both --source and --dest (missing \(hasSource ? "--dest" : "--source")); "
                + "'clonectl start \(name)' alone resumes an existing job"
        }
        if spaceBudget && !discardSource {
            return spaceBudgetWithoutDiscard
        }
        if hydrateOnRead && !export {
            return hydrateOnReadWithoutExport
        }
        return nil
    }

    /// Why `--hydrate-on-read` is refused without `--export`.
    public static let hydrateOnReadWithoutExport =
        "--hydrate-on-read applies only with --export: only reads through the job's NBD export can hydrate (add --export, or leave out --hydrate-on-read)"

    /// Why `--space-budget` is refused for a job that does not discard its source.
    public static let spaceBudgetWithoutDiscard =
        "--space-budget applies only with --discard-source: a job that does not discard its source releases nothing, "
        + "so there is nothing to budget (add --discard-source, or leave out --space-budget)"

    /// The tunables shared by `start` and `set`.
    public static let tunableOptions: Set<String> = [
        "--threshold", "--batch-size", "--commit-interval", "--space-budget", "--rate-limit",
    ]

    /// `clonectl wait NAME --timeout D`: a zero timeout would race the first status update.
    public static func waitProblem(timeoutMs: Int?) -> String? {
        if timeoutMs == 0 {
            return
                "--timeout must be longer than 0, e.g. 30s (leave it out to wait without a limit; 'clonectl status NAME' shows the state now)"
        }
        return nil
    }

    /// `clonectl --socket PATH check|dump ...`: those commands read the metadata file themselves.
    public static func offlineProblem(command: String, socket: String?) -> String? {
        guard socket != nil else { return nil }
        return
            "--socket does not apply to '\(command)': it reads the metadata file directly, without the daemon (leave out --socket)"
    }
}
