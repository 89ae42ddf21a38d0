import CloneCtlCore
import DigestCommand
import HydrationRemote

#if canImport(Glibc)
    import Glibc
#endif

// `clonectl digest` for NBD URIs: clonectl execs this program, next to its own binary, when an
// argument is an NBD URI, so that only this one links libnbd. It takes what clonectl already
// parsed: `clonectl-nbd digest [--json] [--threads N] [--] PATH|URI ...`.
var args = Array(CommandLine.arguments.dropFirst())
func usage(_ why: String) -> Never {
    DigestRunner.writeErr(
        "clonectl-nbd: \(why)\nusage: clonectl-nbd digest [--json] [--threads N] [--] PATH|URI ...\n(normally run by 'clonectl digest')\n"
    )
    exit(CloneExit.usage.rawValue)
}
guard args.first == "digest" else { usage("the only command is 'digest'") }
args.removeFirst()
var json = false
var threads: Int?
var paths = [String]()
var options = true
while !args.isEmpty {
    let a = args.removeFirst()
    if options && a == "--" {
        options = false
    } else if options && a == "--json" {
        json = true
    } else if options && a == "--threads" {
        guard let v = args.first.flatMap({ Int($0) }), v > 0 else { usage("--threads takes a number > 0") }
        args.removeFirst()
        threads = v
    } else if options && a.hasPrefix("-") && a != "-" {
        usage("unknown option '\(a)'")
    } else {
        paths.append(a)
    }
}
if paths.isEmpty { usage("nothing to digest") }
for p in paths {
    if let problem = DigestRunner.usageProblem(p) { usage(problem) }
}
exit(DigestRunner.run(paths: paths, json: json, threads: threads, remote: NBDRemoteDevices()))
