import Testing

@testable import HydrationStorage

/// The identity module on its own: the stable-ID type, confirmation, reservations.
@Suite struct StableIDTypeTests {
    @Test func grammarAndScheme() {
        let f = StableID.file(filesystem: "uuid=ab", inode: 12, birthSeconds: 3, birthNanoseconds: "000000004")
        #expect(f.text == "file:uuid=ab:ino=12:btime=3.000000004")
        #expect(f.scheme == "file")
        let l = StableID.loop(backing: f, offset: 0, sizeLimit: 4096)
        #expect(l.text == "loop:file:uuid=ab:ino=12:btime=3.000000004:offset=0:sizelimit=4096")
        #expect(l.scheme == "loop")
        #expect(StableID.partition(of: StableID.wwid("x"), number: "2", start: "2048").text == "part:wwid:x:2:2048")
        #expect(StableID.deviceMapper(uuid: "LVM-1").text == "dm:uuid=LVM-1")
        #expect(StableID.deviceMapper(name: "vg-lv").text == "dm:name=vg-lv")
        #expect(StableID.mdArray(uuid: "u").text == "md:u")
        #expect(StableID.serial("S1").text == "serial:S1")
        #expect(StableID.bootScoped(bootID: "b", diskSequence: "9").text == "boot:b:diskseq:9")
        #expect(StableID.none.isEmpty && StableID.none.scheme == nil)
        #expect(StableID("nonsense").scheme == nil)
        let base = RemoteIdentity.baseID(exportName: "disk", size: 1 << 20, description: nil)
        #expect(base == "nbd:export=disk;size=1048576;desc=none")
        #expect(StableID(base).scheme == "nbd")
    }

    /// An ID longer than the record keeps: cut to 256 bytes when recorded, and compared in that
    /// form, so that it confirms its own device after a restart and no other.
    @Test func comparedUnderTheRecordsLimit() {
        let long = StableID(String(repeating: "w", count: 255) + "€" + String(repeating: "z", count: 60))
        #expect(long.text.utf8.count > StableID.recordLimit)
        let recorded = long.recorded
        #expect(recorded.text.utf8.count <= StableID.recordLimit + 2)
        #expect(recorded.confirms(long))
        #expect(long.confirms(long))
        #expect(!recorded.confirms(StableID("v" + long.text.dropFirst())))
        #expect(!StableID.none.confirms(.none))
        let short = StableID("serial:abc")
        #expect(short.recorded == short && short.confirms(short) && !short.confirms(StableID("serial:abd")))
    }
}

@Suite struct DeviceConfirmationTests {
    func info(_ path: String, _ kind: DeviceKind = .blockDevice, rdev: UInt64 = 7, size: UInt64 = 1 << 20, id: String)
        -> DeviceInfo
    {
        DeviceInfo(
            path: path, identity: DeviceIdentity(kind: kind, device: 0, inode: 0, rdev: rdev), size: size,
            logicalBlockSize: 512, stableID: id)
    }

    /// Each refusal carries its fields: the path it concerns and the request parameter.
    @Test func refusalsCarryTheirFields() {
        let recorded = DeviceRecord(info("/dev/a", id: "serial:A"))
        do {
            try DeviceConfirmation.confirm(
                info("/dev/a", id: "serial:B"), is: recorded, what: "destination", metadataPath: "/m", exactSize: false)
            Issue.record("another disk was confirmed")
        } catch {
            #expect(error.kind == .unconfirmed && error.path == "/dev/a" && error.parameter == "dest")
        }
        do {
            try DeviceConfirmation.confirm(
                info("/dev/a", size: 1 << 10, id: "serial:A"), is: recorded, what: "source", metadataPath: "/m",
                exactSize: true)
            Issue.record("a smaller device was confirmed")
        } catch {
            #expect(error.kind == .mismatch && error.path == "/m" && error.parameter == "source")
        }
        do {
            try DeviceConfirmation.checkDistinct(
                source: info("/dev/a", id: ""), dest: info("/dev/b", id: ""), metadata: nil)
            Issue.record("the same device twice was accepted")
        } catch {
            #expect(error.kind == .sameDevice && error.path == "/dev/b")
        }
        #expect(throws: Never.self) {
            try DeviceConfirmation.confirm(
                info("/dev/sdz", rdev: 99, id: "serial:A"), is: recorded, what: "source", metadataPath: "/m",
                exactSize: true)
        }
    }
}

@Suite struct ReservationsTests {
    @Test func byPathAndByReadersOnly() {
        let claims = [
            Reservations.Claim(path: "/d1", role: "destination", noReaders: false),
            Reservations.Claim(path: "/s2", role: "source", noReaders: true),
        ]
        let none: (String) -> StorageStack? = { _ in nil }
        // Reading another job's destination is not refused; writing it is.
        #expect(
            Reservations.firstConflict([.init(label: "source", path: "/d1", readOnly: true)], claims, stack: none)
                == nil)
        let w = Reservations.firstConflict(
            [.init(label: "destination", path: "/d1", readOnly: false)], claims, stack: none)
        #expect(w?.claim == 0 && w?.detail == "/d1")
        // A source being released is not even to be read.
        let r = Reservations.firstConflict([.init(label: "source", path: "/s2", readOnly: true)], claims, stack: none)
        #expect(r?.claim == 1)
    }
}
