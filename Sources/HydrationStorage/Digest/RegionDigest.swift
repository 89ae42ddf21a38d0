import Crypto

/// The digest a `DestinationMismatch` reports for a region: plain SHA-256 of the region's bytes,
/// so that an operator can check either side with `dd … | sha256sum`.
public enum RegionDigest {
    /// SHA-256 of `bytes`, lowercase hex.
    public static func sha256Hex(_ bytes: UnsafeRawBufferPointer) -> String {
        var h = SHA256()
        h.update(bufferPointer: bytes)
        return ImageDigest.Hash(h.finalize()).hex
    }

    /// SHA-256 of `count` zero bytes, lowercase hex (a hole's or a zero region's expected digest).
    public static func zerosSHA256Hex(count: Int) -> String {
        var h = SHA256()
        let chunk = [UInt8](repeating: 0, count: min(count, 1 << 20))
        var left = count
        chunk.withUnsafeBytes { z in
            while left > 0 {
                let n = min(left, z.count)
                h.update(bufferPointer: UnsafeRawBufferPointer(rebasing: z[0..<n]))
                left -= n
            }
        }
        return ImageDigest.Hash(h.finalize()).hex
    }
}
