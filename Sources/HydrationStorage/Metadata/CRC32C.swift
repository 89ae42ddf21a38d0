import CLinux

/// CRC-32C (Castagnoli), the checksum of every metadata block: the one ext4, btrfs and iSCSI use,
/// reflected polynomial 0x82F63B78. Slicing-by-8 in software; metadata blocks are small.
public enum CRC32C {
    static let tables: [[UInt32]] = {
        var t = [[UInt32]](repeating: [UInt32](repeating: 0, count: 256), count: 8)
        for i in 0..<256 {
            var c = UInt32(i)
            for _ in 0..<8 { c = (c & 1) != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            t[0][i] = c
        }
        for i in 0..<256 {
            for k in 1..<8 { t[k][i] = (t[k - 1][i] >> 8) ^ t[0][Int(t[k - 1][i] & 0xff)] }
        }
        return t
    }()

    public static func checksum(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        var ok: Int32 = 0
        if let base = bytes.baseAddress {
            let hw = hyd_crc32c_hw(~seed, base, UInt64(bytes.count), &ok)
            if ok != 0 { return ~hw }
        }
        return software(bytes, seed: seed)
    }

    /// The table-driven version (also the reference the hardware path is tested against).
    static func software(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        var crc = ~seed
        let t = tables
        var i = 0
        let n = bytes.count
        while i + 8 <= n {
            let lo =
                UInt32(bytes[i]) | UInt32(bytes[i + 1]) << 8 | UInt32(bytes[i + 2]) << 16 | UInt32(bytes[i + 3]) << 24
            let x = lo ^ crc
            crc =
                t[7][Int(x & 0xff)] ^ t[6][Int((x >> 8) & 0xff)] ^ t[5][Int((x >> 16) & 0xff)] ^ t[4][Int(x >> 24)]
                ^ t[3][Int(bytes[i + 4])] ^ t[2][Int(bytes[i + 5])] ^ t[1][Int(bytes[i + 6])] ^ t[0][Int(bytes[i + 7])]
            i += 8
        }
        while i < n {
            crc = t[0][Int((crc ^ UInt32(bytes[i])) & 0xff)] ^ (crc >> 8)
            i += 1
        }
        return ~crc
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0) }
    }
}
