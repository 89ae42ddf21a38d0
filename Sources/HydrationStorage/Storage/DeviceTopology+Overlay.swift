import CLinux

#if canImport(Glibc)
    import Glibc
#endif

extension DeviceTopology {
    // MARK: overlayfs

    /// The real files behind a file of an overlay filesystem: its upper file and the lower
    /// files of the same name that exist (`upperdir`/`lowerdir`/`lowerdir+`/`datadir+` of the
    /// mount, from /proc/self/mountinfo). The merged file and its upper file are one file under
    /// two device numbers; a lower file is what the merged file reads until it is copied up.
    /// Empty for a file on any other filesystem.
    func overlayLayers(of path: String, device dev: UInt64) -> [String] {
        guard majorOf(dev) == 0 else { return [] }
        let key = "\(majorOf(dev)):\(minorOf(dev))"
        guard let real = realPath(path) else { return [] }
        var out: [String] = []
        for m in mounts() where m.device == key && m.fsType == "overlay" {
            guard real == m.mountPoint || real.hasPrefix(m.mountPoint == "/" ? "/" : m.mountPoint + "/") else {
                continue
            }
            let inMount = String(real.dropFirst(m.mountPoint == "/" ? 0 : m.mountPoint.count))
            let rel = (m.root == "/" ? "" : m.root) + inMount
            for dir in Self.overlayDirectories(m.superOptions) {
                let candidate = dir + rel
                if exists(candidate), !out.contains(candidate) { out.append(candidate) }
            }
        }
        return out
    }

    /// upperdir, then every lower and data directory, from an overlay mount's super options
    /// (`lowerdir=a:b`, or one `lowerdir+=`/`datadir+=` per directory on newer kernels). A
    /// backslash escapes: `\ooo` (octal, as mountinfo writes space, comma, backslash) or the next
    /// character (`\:` in a lower directory's name).
    static func overlayDirectories(_ options: String) -> [String] {
        // Split on unescaped separators, then unescape each piece.
        func split(_ s: [Character], on sep: Character) -> [[Character]] {
            var out: [[Character]] = [], cur: [Character] = [], i = 0
            while i < s.count {
                if s[i] == "\\", i + 1 < s.count { cur += [s[i], s[i + 1]]; i += 2; continue }
                if s[i] == sep { out.append(cur); cur = [] } else { cur.append(s[i]) }
                i += 1
            }
            out.append(cur)
            return out
        }
        func unescape(_ s: [Character]) -> String {
            var out = "", i = 0
            while i < s.count {
                if s[i] == "\\", i + 3 < s.count, let v = UInt8(String(s[(i + 1)...(i + 3)]), radix: 8) {
                    out.append(Character(UnicodeScalar(v))); i += 4; continue
                }
                if s[i] == "\\", i + 1 < s.count { out.append(s[i + 1]); i += 2; continue }
                out.append(s[i]); i += 1
            }
            return out
        }
        var upper: [String] = [], lower: [String] = []
        for field in split(Array(options), on: ",") {
            guard let eq = field.firstIndex(of: "=") else { continue }
            let key = String(field[..<eq])
            let dirs = split(Array(field[(eq + 1)...]), on: ":").map(unescape).filter { !$0.isEmpty }
            switch key {
            case "upperdir": upper = dirs
            case "lowerdir", "lowerdir+", "datadir+": lower += dirs
            default: break
            }
        }
        return upper + lower
    }
}
