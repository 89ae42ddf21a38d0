/// What other jobs still need, and whether a new job's paths touch it: by path, and by what the
/// bytes live on (a loop device over the file, a partition of the disk, a dm/md device...), so
/// that an alias does not get around it. The daemon gathers the claims and refuses the conflict.
package enum Reservations {
    /// One of a new job's paths. `readOnly`: the job only reads it (a source it does not
    /// release), which conflicts only with a claim that allows no readers.
    package struct Target: Sendable, Equatable {
        package var label: String
        package var path: String
        package var readOnly: Bool
        package init(label: String, path: String, readOnly: Bool) {
            self.label = label; self.path = path; self.readOnly = readOnly
        }
    }

    /// A path another job (or a kept record) still needs, as its `role` there. `noReaders`: not
    /// even to be read (a discard_source job's source, being punched).
    package struct Claim: Sendable, Equatable {
        package var path: String
        package var role: String
        package var noReaders: Bool
        package init(path: String, role: String, noReaders: Bool) {
            self.path = path; self.role = role; self.noReaders = noReaders
        }
    }

    /// The first target that touches a claim: the target, what they share (the path itself, or
    /// the overlap of their storage stacks, described), and the claim's index. `stack` gives the
    /// storage stack of a path (nil when it has none or the provider cannot tell); it is asked
    /// only when the paths differ. Blocking when `stack` is.
    package static func firstConflict(
        _ targets: [Target], _ claims: [Claim], stack: (String) -> StorageStack?
    ) -> (target: Target, detail: String, claim: Int)? {
        for t in targets {
            for (i, c) in claims.enumerated() where !t.readOnly || c.noReaders {
                if c.path == t.path { return (t, t.path, i) }
                if let a = stack(t.path), let b = stack(c.path),
                    let why = a.overlap(with: b, as: t.label, otherLabel: c.role)
                {
                    return (t, why, i)
                }
            }
        }
        return nil
    }
}
