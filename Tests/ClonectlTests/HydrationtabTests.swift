import CloneCtlCore
import Testing

/// hydrationtab(5) as `clonectl apply` reads it: every accepted form, and a named line for each
/// kind of mistake.
@Suite struct HydrationtabTests {
    @Test func parsesLinesCommentsDefaultsAndOptions() throws {
        let text = """
            # name   source            dest            metadata        options
            vm1      /srv/old/vm1.img  /srv/new/vm1.img  -  discard-source,region-size=1M,rate-limit=20M,export,verify
              \t
            vm2 nbd://old-host/vm2 /dev/vg/vm2 /var/lib/m/vm2.meta no-hydration   # trailing comment
            vm3 /srv/old/my\\040disk.img /srv/new/vm3.img
            vm4 /a /b - -
            """
        let e = try Hydrationtab.parse(text, file: "tab")
        #expect(e.map(\.name) == ["vm1", "vm2", "vm3", "vm4"])
        #expect(e.map(\.line) == [2, 4, 5, 6])
        #expect(e[0].metadata == nil)
        #expect(e[0].options.discardSource && e[0].options.export && !e[0].options.noHydration)
        #expect(e[0].options.regionSize == 1 << 20)
        #expect(e[0].options.rateLimitBytesPerSecond == 20_000_000 || e[0].options.rateLimitBytesPerSecond == 20 << 20)
        #expect(e[1].source == "nbd://old-host/vm2" && e[1].metadata == "/var/lib/m/vm2.meta")
        #expect(e[1].options.noHydration)
        #expect(e[2].source == "/srv/old/my disk.img", "\\040 is a space, as in fstab")
        #expect(e[3].options == Hydrationtab.Options())
        let p = Hydrationtab.startParameters(e[0])
        #expect(p.name == "vm1" && p.source == "/srv/old/vm1.img" && p.discardSource == true && p.export == true)
        #expect(p.regionSize == 1 << 20 && p.noHydration == nil && p.verify == true)
        #expect(Hydrationtab.startParameters(e[1]).verify == nil)
    }

    @Test(arguments: [
        ("vm1 /a /b - compress", 1, "unknown option 'compress'"),
        ("\n\nvm1 /a", 3, "expected NAME SOURCE DEST"),
        ("vm1 /a /b - - extra", 1, "at most 5 fields"),
        ("vm1 /a /b\nvm1 /c /d", 2, "declared twice (first on line 1)"),
        ("vm1 old.img /b", 1, "must be an absolute path or an NBD URI"),
        ("vm1 /a new.img", 1, "destination 'new.img' must be an absolute path"),
        ("vm1 /a /b meta", 1, "metadata 'meta' must be an absolute path"),
        ("vm1 /a /b - space-budget=1G", 1, "space-budget applies only with discard-source"),
        ("vm1 /a /b - hydrate-on-read", 1, "hydrate-on-read applies only with export"),
        ("vm1 /a /b - region-size=3K", 1, "power of two"),
        ("vm1 /a /b - region-size", 1, "needs a value"),
        ("vm1 /a /b - export=yes", 1, "takes no value"),
        ("vm1 /a /b - export,export", 1, "given twice"),
        ("vm1 /a /b - io=fast", 1, "io must be auto, buffered or direct"),
        ("vm1 /a /b - threshold=0", 1, "positive count"),
        ("vm/1 /a /b", 1, "invalid job name"),
        ("vm1 /a\\0 /b", 1, "octal escape"),
    ])
    func namesTheLineAndTheMistake(text: String, line: Int, needle: String) {
        #expect {
            _ = try Hydrationtab.parse(text, file: "/etc/hydrationtab")
        } throws: { error in
            guard let e = error as? Hydrationtab.ParseError else { return false }
            return e.line == line && e.file == "/etc/hydrationtab" && e.message.contains(needle)
                && e.description.hasPrefix("/etc/hydrationtab:\(line): ")
        }
    }
}
