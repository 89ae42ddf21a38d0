/// The Varlink interface definitions served by hydrationd (returned verbatim by
/// `org.varlink.service.GetInterfaceDescription`) and the service metadata of `GetInfo`.
public enum ControlInterface {
    public static let name = ControlMethod.interfaceName

    /// The interface definition of `org.hydrationd.Control`. It mirrors `JobStatus` (schema version 1)
    /// and the parameter/reply types in ControlMessages.swift; `ControlProtocolTests` checks that they
    /// agree field by field.
    public static let description = """
        # Control interface of hydrationd, a dm-clone-like hydration service: it copies a source
        # image or block device onto a destination region by region, records progress in crash-safe
        # metadata, and can release (discard) source regions once their copy is durably committed.
        interface org.hydrationd.Control

        # Source of a job. io: how it is read while the job has it open (direct: O_DIRECT
        # for aligned calls; absent for a remote source or a job not open), io_reason: why.
        type JobSource (
          path: string,
          size_bytes: int,
          io: ?(direct, buffered),
          io_reason: ?string
        )

        # Destination of a job; io and io_reason as for the source.
        type JobDest (
          path: string,
          io: ?(direct, buffered),
          io_reason: ?string
        )

        # Region counts.
        type JobRegions (
          total: int,
          hydrated: int,
          hydrating: int
        )

        # Byte counts. committed <= hydrated; skipped_zero counts zero regions not written.
        type JobBytes (
          total: int,
          hydrated: int,
          committed: int,
          skipped_zero: int,
          discarded: int
        )

        # Metadata commits.
        type JobCommits (
          count: int,
          last_unix_ms: ?int,
          last_duration_ms: ?float
        )

        # Source discard: pending_bytes are committed but not yet released; failed counts regions
        # whose discard failed.
        type JobDiscard (
          enabled: bool,
          pending_bytes: int,
          failed: int
        )

        # Run-time tunables (changeable with Set).
        type JobSettings (
          threshold: int,
          batch_size: int,
          rate_limit_bytes_per_second: ?int,
          commit_interval_ms: int
        )

        # Metadata file and its mode: rw normally, ro after a failed commit, fail when unusable.
        type JobMetadata (
          path: string,
          mode: (rw, ro, fail)
        )

        # Why a job failed. DestinationMismatch (verify): region and offset (first byte that
        # differs) name where the destination did not read back what the source gave;
        # expected_digest and found_digest are the SHA-256 (hex) of that region as read from the
        # source and as read back from the destination. Nothing of it was committed or released.
        type JobError (
          code: string,
          message: string,
          errno: ?int,
          region: ?int,
          offset: ?int,
          expected_digest: ?string,
          found_digest: ?string
        )

        # Verified release: verified_bytes were read back from the destination (bypassing the
        # page cache) and found equal to the source's bytes before they were committed;
        # mismatches counts regions found different; read_back says how the page cache was
        # bypassed: direct (O_DIRECT), evicted (written back, waited for, dropped, then read),
        # device (no page cache).
        type JobVerify (
          enabled: bool,
          verified_bytes: int,
          mismatches: int,
          read_back: ?(direct, evicted, device)
        )

        # The job's clone served over NBD: uri for any NBD client (nbd+unix:///NAME?socket=PATH);
        # clients counts the connections using it now; io what clients did through it since
        # the job was opened (absent for a complete job served from its destination alone):
        # hydrated_regions are regions clients hydrated (writes, trims, zeroes, cache).
        type JobExportIO (
          read_bytes: int,
          written_bytes: int,
          trimmed_bytes: int,
          hydrated_regions: int
        )

        type JobExport (
          uri: string,
          clients: int,
          hydrate_on_read: bool,
          io: ?JobExportIO
        )

        # The status of one job. version is the schema version (currently 1); fields are only
        # ever added.
        type JobStatus (
          version: int,
          name: string,
          state: (idle, hydrating, paused, complete, failed),
          source: JobSource,
          dest: JobDest,
          region_size: int,
          regions: JobRegions,
          bytes: JobBytes,
          throughput_bytes_per_second: float,
          eta_seconds: ?float,
          commits: JobCommits,
          discard: JobDiscard,
          space_budget_bytes: ?int,
          settings: JobSettings,
          metadata: JobMetadata,
          error: ?JobError,
          export: ?JobExport,
          verify: ?JobVerify
        )

        # One line of List.
        type JobSummary (
          name: string,
          state: (idle, hydrating, paused, complete, failed),
          source_path: string,
          dest_path: string,
          regions_total: int,
          regions_hydrated: int,
          discard_enabled: bool
        )

        # What CheckMetadata found. Unreadable fields are null; problems is empty when valid.
        type MetadataReport (
          path: string,
          valid: bool,
          version: ?int,
          generation: ?int,
          job_id: ?string,
          region_size: ?int,
          target_size_bytes: ?int,
          regions_total: ?int,
          regions_hydrated: ?int,
          discard_source: ?bool,
          dest_zeroed: ?bool,
          complete: ?bool,
          source_path: ?string,
          dest_path: ?string,
          created_unix_ms: ?int,
          committed_unix_ms: ?int,
          problems: []string
        )

        # Create a job from source to dest and start it (paused when no_hydration), or, with only
        # name, resume the existing job of that name. Paths are absolute. created tells which.
        # A parameter that would not take effect is refused with InvalidParameter naming it:
        # space_budget_bytes without discard_source: true, or tunables without source and dest.
        # export serves the job's clone as NBD export name on the daemon's NBD socket, also
        # after a restart, until the job is removed. hydrate_on_read (with export): a read the
        # source serves also hydrates the regions it read, in the background. io: auto (the
        # default: direct I/O for a regular-file source, else buffered),
        # buffered or direct. verify: every copied region is read back from the destination,
        # bypassing the page cache, and compared with the source's bytes before it is committed
        # (so before it is released); a difference fails the job with DestinationMismatch.
        method Start(
          name: string,
          source: ?string,
          dest: ?string,
          metadata: ?string,
          region_size: ?int,
          discard_source: ?bool,
          dest_zeroed: ?bool,
          no_hydration: ?bool,
          threshold: ?int,
          batch_size: ?int,
          commit_interval_ms: ?int,
          space_budget_bytes: ?int,
          rate_limit_bytes_per_second: ?int,
          export: ?bool,
          hydrate_on_read: ?bool,
          io: ?(auto, buffered, direct),
          verify: ?bool
        ) -> (job: JobStatus, created: bool)

        # Stop copying after the regions in flight, with a final commit.
        method Pause(name: string) -> (job: JobStatus)

        # Continue a paused job.
        method Resume(name: string, accept_devices: ?bool) -> (job: JobStatus)

        # Status of one job, or of every job when name is null. Called with more, it replies
        # with an update per interval until the job ends or the client disconnects.
        method GetStatus(name: ?string) -> (jobs: []JobStatus)

        # Every job, briefly.
        method List() -> (jobs: []JobSummary)

        # Change tunables of a job; omitted ones keep their value. 0 means no limit for
        # rate_limit_bytes_per_second and space_budget_bytes. space_budget_bytes for a job
        # without discard_source is refused with InvalidParameter.
        method Set(
          name: string,
          threshold: ?int,
          batch_size: ?int,
          rate_limit_bytes_per_second: ?int,
          space_budget_bytes: ?int,
          commit_interval_ms: ?int
        ) -> (job: JobStatus)

        # Commit the job's progress now; replies once the commit is durable.
        method Commit(name: string) -> (job: JobStatus)

        # Forget a job (its destination stays on disk). A hydrating job is refused with
        # JobRunning unless force, which pauses it with a final commit first. An incomplete
        # discard_source job whose source is partly released is refused with DataAtRisk unless
        # force; even then its metadata is kept (kept_metadata says where), and a new job on its
        # destination is refused until it is resumed (Start with that metadata) or the file is
        # deleted by hand. An exported job with NBD clients connected is refused with
        # ExportInUse unless force, which disconnects them; its export ends before the job closes.
        method Remove(name: string, force: ?bool) -> (kept_metadata: ?string)

        # Validate a metadata file, read-only.
        method CheckMetadata(path: string) -> (report: MetadataReport)

        # No job has this name.
        error NoSuchJob (name: string)

        # A job with this name already exists.
        error JobExists (name: string)

        # The job is active; pause it first or pass force.
        error JobRunning (name: string, state: string)

        # A parameter has a value the daemon cannot accept.
        error InvalidParameter (parameter: string, reason: string)

        # The device or file is already the source, destination or metadata of another job.
        error DeviceInUse (path: string, job: string, message: ?string)

        # The destination is smaller than the source.
        error SizeMismatch (source_bytes: int, dest_bytes: int, message: ?string)

        # The metadata file is damaged or belongs to a different job.
        error MetadataCorrupt (path: string, reason: string)

        # A new job's metadata file already exists: nothing was created or changed.
        error MetadataExists (path: string, message: string)

        # The caller may not call this method: mutating methods need root, the daemon's user,
        # or membership in the control socket's group.
        error PermissionDenied (method: string, reason: string)

        # The job has failed; code is stable, message is for humans.
        error JobFailed (name: string, code: string, message: string)

        # An I/O operation failed.
        error IOError (path: ?string, errno: ?int, message: string)

        # The message was not a valid Varlink call (malformed JSON, missing method...).
        error InvalidMessage (reason: string)

        # The message exceeded the size limit; the connection is closed.
        error MessageTooLarge (limit: int)

        # The daemon has too many connections; the connection is closed.
        error TooManyConnections (limit: int)

        # An unexpected failure inside the daemon.
        error InternalError (message: string)

        # The request would destroy the only record of data still needed; the message says
        # what, and how to go on.
        error DataAtRisk (name: string, message: string)

        # The device at a job's path cannot be confirmed to be the job's own (renumbered,
        # replaced, swapped, or without a stable identity): nothing is written or released.
        error DeviceUnconfirmed (path: string, message: string)

        # Remove of an exported job while NBD clients are connected to it (pass force to
        # disconnect them).
        error ExportInUse (name: string, clients: int, message: string)

        # A record in the daemon's state directory (path) cannot be read: the message says why.
        # The job (name; empty for a removed job's kept record) stays listed, failed, and every
        # device it names stays reserved; nothing is written or released for it until the
        # operator repairs the file (then resumes) or removes the job with force.
        error JobRecordUnreadable (name: string, path: string, message: string)
        """

    /// The standard `org.varlink.service` interface every Varlink service provides.
    public static let serviceDescription = """
        # The Varlink Service Interface is provided by every varlink service. It
        # describes the service and the interfaces it implements.
        interface org.varlink.service

        # Get a list of all the interfaces a service provides and information
        # about the implementation.
        method GetInfo() -> (
          vendor: string,
          product: string,
          version: string,
          url: string,
          interfaces: []string
        )

        # Get the description of an interface that is implemented by this service.
        method GetInterfaceDescription(interface: string) -> (description: string)

        # The requested interface was not found.
        error InterfaceNotFound (interface: string)

        # The requested method was not found
        error MethodNotFound (method: string)

        # The interface defines the requested method, but the service does not
        # implement it.
        error MethodNotImplemented (method: string)

        # One of the passed parameters is invalid.
        error InvalidParameter (parameter: string)

        # Client is denied access
        error PermissionDenied ()

        # Method is expected to be called with 'more' set to true, but wasn't
        error ExpectedMore ()
        """

    public static let serviceInterfaceName = "org.varlink.service"

    /// Descriptions by interface name, for `GetInterfaceDescription`.
    public static let descriptions: [String: String] = [
        name: description,
        serviceInterfaceName: serviceDescription,
    ]
}
