import CLinux

#if canImport(Glibc)
    import Glibc
#endif

extension DeviceTopology {
    // MARK: sysfs helpers

    /// The sysfs directory of a block device (/sys/dev/block/M:m resolved).
    func blockDir(_ rdev: UInt64) -> String? {
        realPath("\(sysfs)/dev/block/\(majorOf(rdev)):\(minorOf(rdev))")
    }

    func devNumber(ofDir dir: String) -> UInt64? {
        guard let s = read(dir + "/dev") else { return nil }
        let p = s.split(separator: ":")
        guard p.count == 2, let ma = UInt64(p[0]), let mi = UInt64(p[1]) else { return nil }
        return makeDev(ma, mi)
    }

    func exists(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0
    }

    func realPath(_ path: String) -> String? {
        guard let r = realpath(path, nil) else { return nil }
        defer { free(r) }
        return String(cString: r)
    }

    /// open(2), noting in `failure` a refusal for want of descriptors.
    func openRecording(_ path: String, _ flags: Int32, _ failure: ResourceFailure?) -> Int32 {
        let fd = open(path, flags)
        if fd < 0, errno == EMFILE || errno == ENFILE { failure?.errno = errno }
        return fd
    }

    /// A small text file, trimmed of trailing whitespace.
    func read(_ path: String, limit: Int = 65536, failure: ResourceFailure? = nil) -> String? {
        let fd = openRecording(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK, failure)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while out.count < limit {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 { if errno == EINTR { continue }; return nil }
            if n == 0 { break }
            out += buf[0..<n]
        }
        var s = String(decoding: out, as: UTF8.self)
        while let l = s.last, l == "\n" || l == " " || l == "\t" || l == "\0" { s.removeLast() }
        return s
    }

    func list(_ dir: String) -> [String] {
        guard let d = opendir(dir) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let name = withUnsafePointer(to: &e.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { out.append(name) }
        }
        return out
    }
}

/// Where the identity functions note that a file could not be opened for want of descriptors.
/// Local to one call (never shared between threads).
final class ResourceFailure {
    var errno: Int32?
}

func majorOf(_ d: UInt64) -> UInt64 { ((d >> 8) & 0xfff) | ((d >> 32) & ~UInt64(0xfff)) }
func minorOf(_ d: UInt64) -> UInt64 { (d & 0xff) | ((d >> 12) & ~UInt64(0xff)) }
func makeDev(_ ma: UInt64, _ mi: UInt64) -> UInt64 {
    ((ma & 0xfff) << 8) | ((ma & ~UInt64(0xfff)) << 32) | (mi & 0xff) | ((mi & ~UInt64(0xff)) << 12)
}

func baseName(_ p: String) -> String {
    guard let s = p.lastIndex(of: "/") else { return p }
    return String(p[p.index(after: s)...])
}

func hexString<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
    let digits = Array("0123456789abcdef")
    var s = ""
    for b in bytes { s.append(digits[Int(b >> 4)]); s.append(digits[Int(b & 15)]) }
    return s
}

func nsecString(_ n: UInt32) -> String {
    let s = String(n)
    return String(repeating: "0", count: max(0, 9 - s.count)) + s
}

/// Orders "loop2" before "loop10".
func natural(_ a: String, _ b: String) -> Bool {
    let pa = a.prefix { !$0.isNumber }, pb = b.prefix { !$0.isNumber }
    if pa != pb { return a < b }
    if let x = Int(a.dropFirst(pa.count)), let y = Int(b.dropFirst(pb.count)) { return x < y }
    return a < b
}

extension String {
    /// At least `n` characters, zeros in front (maps' "fd:00").
    func leftPadded(_ n: Int) -> String { count >= n ? self : String(repeating: "0", count: n - count) + self }
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
func unescapeMount(_ s: String) -> String {
    guard s.contains("\\") else { return s }
    var out: [UInt8] = []
    let u = Array(s.utf8)
    var i = 0
    while i < u.count {
        if u[i] == UInt8(ascii: "\\"), i + 3 < u.count,
            let v = UInt8(String(decoding: u[(i + 1)...(i + 3)], as: UTF8.self), radix: 8)
        {
            out.append(v); i += 4
        } else {
            out.append(u[i]); i += 1
        }
    }
    return String(decoding: out, as: UTF8.self)
}
