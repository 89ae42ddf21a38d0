#if canImport(Glibc)
    import Glibc
#endif

/// Where the daemon keeps its state and its control socket when not told otherwise. Shared by
/// hydrationd and clonectl so both agree without configuration.
///
/// | | under systemd | as root | otherwise |
/// |---|---|---|---|
/// | state | `$STATE_DIRECTORY` | `/var/lib/hydrationd` | `$XDG_STATE_HOME/hydrationd` (`~/.local/state/hydrationd`) |
/// | socket | `$RUNTIME_DIRECTORY/control.sock` | `/run/hydrationd/control.sock` | `$XDG_RUNTIME_DIR/hydrationd/control.sock` (`/tmp/hydrationd-UID/control.sock`) |
public enum DefaultPaths {
    static func env(_ name: String) -> String? {
        guard let v = getenv(name) else { return nil }
        let s = String(cString: v)
        return s.isEmpty ? nil : s
    }

    /// systemd may pass several directories separated by ':'; the first is ours.
    static func firstOf(_ list: String) -> String {
        String(list.split(separator: ":").first ?? Substring(list))
    }

    public static func stateDirectory() -> String {
        if let d = env("STATE_DIRECTORY") { return firstOf(d) }
        if geteuid() == 0 { return "/var/lib/hydrationd" }
        if let x = env("XDG_STATE_HOME") { return x + "/hydrationd" }
        if let h = env("HOME") { return h + "/.local/state/hydrationd" }
        return "/tmp/hydrationd-\(geteuid())/state"
    }

    public static func socketPath() -> String {
        if let s = env("HYDRATION_SOCKET") { return s }
        if let d = env("RUNTIME_DIRECTORY") { return firstOf(d) + "/control.sock" }
        if geteuid() == 0 { return "/run/hydrationd/control.sock" }
        if let x = env("XDG_RUNTIME_DIR") { return x + "/hydrationd/control.sock" }
        return "/tmp/hydrationd-\(geteuid())/control.sock"
    }
}
