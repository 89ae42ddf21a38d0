// swift-tools-version: 6.2
// A Linux daemon and its client: it builds on Glibc, block-device ioctls, fallocate, leases and
// libsystemd, so there is no Apple platform to declare. Built and tested with Swift 6.3.
import PackageDescription

let package = Package(
    name: "hydration",
    products: [
        .executable(name: "hydrationd", targets: ["hydrationd"]),
        .executable(name: "clonectl", targets: ["clonectl"]),
        .executable(name: "hydrationd-generator", targets: ["hydrationd-generator"]),
        .executable(name: "clonectl-nbd", targets: ["clonectl-nbd"]),
        .library(name: "HydrationService", targets: ["HydrationService"]),
        .library(name: "HydrationEngine", targets: ["HydrationEngine"]),
        .library(name: "ControlProtocol", targets: ["ControlProtocol"]),
        .library(name: "NBDServer", targets: ["NBDServer"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        // SHA-256 of the image digest (BoringSSL's, with SHA-NI where the CPU has it).
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        // The Prometheus text exposition of `hydrationd --metrics-listen` (and swift-metrics under it).
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        // libsystemd (sd_notify, sd_listen_fds, sd_watchdog_enabled), Debian package libsystemd-dev.
        .systemLibrary(
            name: "CSystemd",
            pkgConfig: "libsystemd",
            providers: [.apt(["libsystemd-dev"])]
        ),
        // libnbd (remote sources over NBD: nbd://, nbds://, nbd+unix://), Debian package libnbd-dev.
        .systemLibrary(
            name: "CNBD",
            pkgConfig: "libnbd",
            providers: [.apt(["libnbd-dev"])]
        ),
        // Fixed-signature wrappers for the Linux calls Swift cannot reach directly (ioctl is variadic).
        .target(name: "CLinux"),
        // Wire types shared by the daemon and clonectl: Varlink framing, interface, requests, replies, errors.
        .target(name: "ControlProtocol"),
        // The storage layer (the one owner of pread/pwrite/fdatasync/fallocate/ioctl/lseek) and the
        // metadata format on it. A target of its own so that clonectl's offline `check`/`dump` read
        // metadata with the engine's code without linking the engine's NIO, libnbd and libsystemd:
        // those made a cold `clonectl` start take 80 ms instead of about 25.
        // It also holds the image digest (ImageDigest), for the engine and clonectl alike.
        .target(
            name: "HydrationStorage",
            dependencies: ["ControlProtocol", "CLinux", .product(name: "Crypto", package: "swift-crypto")]
        ),
        // A server on a Unix stream socket: bind a path (stale socket replaced, mode and group) or
        // adopt a socket-activated descriptor, peer credentials, connection admission, idle
        // timeouts, the accept loop. Under both the Varlink control server and the NBD server.
        .target(
            name: "UnixSocketServer",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        // A Network Block Device server (protocol, codec, server, the export protocol) on
        // UnixSocketServer: swift-nio and swift-log only, for anyone who needs an NBD server.
        .target(
            name: "NBDServer",
            dependencies: [
                "UnixSocketServer",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The libnbd client behind a remote source (`--source nbd://...`): a `RemoteDevices` for
        // `PosixStorage`. A target of its own so that only what opens remote sources links libnbd.
        .target(
            name: "HydrationRemote",
            dependencies: ["HydrationStorage", "CNBD"]
        ),
        // The engine: copier, committer, discarder, region ownership and the job's state machine,
        // on the storage layer. It knows nothing of the daemon, NBD, libnbd or the wire types: the
        // compiler keeps it so (the service converts at the edge).
        .target(
            name: "HydrationEngine",
            dependencies: [
                "HydrationStorage",
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The live clone: a job's clone served over NBD with dm-clone's I/O semantics while it
        // hydrates (LiveCloneExport), a complete job's destination (CompleteCloneExport), and the
        // adapters from the storage layer to NBDServer's export protocol (FileNBDExport, NBDError
        // from a StorageError). On the engine and NBDServer; it knows nothing of the daemon or the
        // wire types.
        .target(
            name: "HydrationLiveClone",
            dependencies: [
                "HydrationEngine",
                "HydrationStorage",
                "NBDServer",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Prometheus metrics (`hydrationd --metrics-listen`): the exposition of the jobs' status
        // snapshots and a small HTTP server on NIOHTTP1 for `GET /metrics`. On the wire types only:
        // neither the engine nor the storage layer knows of it.
        .target(
            name: "HydrationMetrics",
            dependencies: [
                "ControlProtocol",
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The daemon's service code (jobs, control, systemd, the exports' wiring) and opening jobs
        // on local and remote sources.
        .target(
            name: "HydrationService",
            dependencies: [
                "HydrationEngine",
                "HydrationLiveClone",
                "HydrationStorage",
                "HydrationRemote",
                "NBDServer",
                "UnixSocketServer",
                "ControlProtocol",
                "HydrationMetrics",
                "CSystemd",
                "CLinux",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "hydrationd",
            dependencies: [
                "HydrationService",
                "HydrationMetrics",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // clonectl's parsing (sizes, rates, durations) and output formatting, testable without a daemon.
        .target(
            name: "CloneCtlCore",
            dependencies: ["ControlProtocol"]
        ),
        // `clonectl digest`: shared by clonectl (files and block devices) and clonectl-nbd.
        .target(
            name: "DigestCommand",
            dependencies: ["CloneCtlCore", "HydrationStorage"]
        ),
        // `clonectl digest` of NBD URIs: clonectl runs this (exec, next to its own binary) so that
        // clonectl itself does not load libnbd and its 16 more shared libraries at every start
        // (measured: +0.7 ms median on a Swift binary, +3.6 ms on a bare C one; docs/clonectl.md).
        .executableTarget(
            name: "clonectl-nbd",
            dependencies: ["DigestCommand", "HydrationRemote", "HydrationStorage", "CloneCtlCore"]
        ),
        .executableTarget(
            name: "clonectl",
            dependencies: [
                "DigestCommand",
                "CloneCtlCore",
                "ControlProtocol",
                // Offline `check` and `dump` read metadata files with the engine's own reader.
                "HydrationStorage",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // The systemd generator: /etc/hydrationtab into units at boot and daemon-reload. It reads
        // the table with clonectl's own parser and links nothing else (generators must be fast).
        .executableTarget(
            name: "hydrationd-generator",
            dependencies: ["CloneCtlCore"]
        ),
        // Micro-benchmarks of engine pieces (metadata commit cost); the end-to-end benchmark is Benchmarks/.
        .executableTarget(
            name: "hydration-bench",
            dependencies: ["HydrationService"]
        ),
        // Helpers shared by the test targets: temporary directories, seeded images, real devices
        // (loop, dm, mounts) undone at teardown, and the simulated disks (SimulatedStorage, and
        // CrashableStorage with its volatile cache for the crash explorers). On the storage layer
        // only, so the storage tests link nothing above it. A library (test targets cannot depend
        // on each other) that no product links; it needs no `@testable` import, so it builds in
        // release too.
        .target(
            name: "HydrationTestSupport",
            dependencies: [
                "HydrationStorage",
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Tests/HydrationTestSupport"
        ),
        // Tests that need the service: jobs opened and observed through it (`HydrationJob.create`,
        // `status()`), the daemon (JobManager, ControlServer), systemd, the NBD export wiring.
        .testTarget(
            name: "HydrationServiceTests",
            dependencies: [
                "HydrationService", "HydrationEngine", "HydrationLiveClone", "HydrationRemote", "ControlProtocol",
                "HydrationTestSupport",
            ]
        ),
        // Tests of the storage layer alone: identity, topology, the metadata format and its
        // corruption and fuzzing, the image digest.
        .testTarget(
            name: "HydrationStorageTests",
            dependencies: [
                "HydrationStorage", "ControlProtocol", "HydrationTestSupport",
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        // Tests of the engine alone (no daemon, NBD or remote source).
        .testTarget(
            name: "HydrationEngineTests",
            dependencies: ["HydrationEngine", "HydrationStorage", "HydrationTestSupport"]
        ),
        .testTarget(
            name: "NBDServerTests",
            dependencies: ["NBDServer"]
        ),
        .testTarget(
            name: "UnixSocketServerTests",
            dependencies: ["UnixSocketServer"]
        ),
        .testTarget(
            name: "HydrationMetricsTests",
            dependencies: ["HydrationMetrics", "ControlProtocol"]
        ),
        .testTarget(
            name: "ControlProtocolTests",
            dependencies: ["ControlProtocol"]
        ),
        .testTarget(
            name: "ClonectlTests",
            dependencies: ["CloneCtlCore", "ControlProtocol"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
