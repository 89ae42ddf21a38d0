import ControlProtocol

extension ControlProtocol.MetadataReport {
    /// The check report of metadata that opened: its fields, and what recovery noticed. One
    /// construction for the daemon's CheckMetadata and clonectl's offline `check`, so the two
    /// always agree.
    public init(path: String, header h: MetadataHeader, recovery r: MetadataRecoveryReport) {
        var problems: [String] = []
        if let other = r.otherSlotProblem { problems.append("superblock slot \(1 - r.superblockSlot): \(other)") }
        if r.uncommittedPageSlots > 0 {
            problems.append(
                "\(r.uncommittedPageSlots) page slot(s) from an interrupted commit, adding \(r.adoptedRegions) region(s); adopted when the job is opened"
            )
        }
        self.init(
            path: path, valid: true, version: Int(h.version), generation: h.generation, jobId: h.jobID,
            regionSize: h.regionSize, targetSizeBytes: h.targetSize, regionsTotal: h.regionCount,
            regionsHydrated: h.hydratedCount, discardSource: h.discardSource, destZeroed: h.destZeroed,
            complete: h.complete, sourcePath: h.source.path, destPath: h.dest.path,
            createdUnixMs: h.createdUnixMs, committedUnixMs: h.committedUnixMs, problems: problems)
    }
}
