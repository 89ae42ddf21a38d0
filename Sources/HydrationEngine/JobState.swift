/// What a job is doing, with everything that belongs to it: the run and how it was asked to stop,
/// why it is paused, the error it failed with and whether it can resume in place, what a complete
/// job still holds open, and whether it is closing. One value, so that after every await the job
/// looks at one thing again rather than at several flags that may have changed in between.
///
/// idle -> hydrating <-> paused; hydrating -> complete | failed; failed -> hydrating (a retry) only
/// while the metadata is still writable and the job needs no reopening. Any of them -> closing(it)
/// -> closed(it): a closing job's run still ends as it would (and its outcome is what it shows).
package enum JobState: Sendable {
    case idle
    case hydrating(HydrationRun)
    case paused(PauseReason, Resumption)
    case failed(HydrationError, Resumption)
    case complete(CompleteHold)
    /// `close` has begun; the job's state as it goes on to change while it closes.
    indirect case closing(JobState)
    /// `close` has finished; the state the job ended in.
    indirect case closed(JobState)

    /// The state inside `closing` and `closed`.
    package var activity: JobState {
        switch self {
        case .closing(let s), .closed(let s): return s.activity
        default: return self
        }
    }

    /// Replaces the state inside `closing` and `closed` (the state itself otherwise).
    package func with(activity s: JobState) -> JobState {
        switch self {
        case .closing: return .closing(s)
        case .closed: return .closed(s)
        default: return s
        }
    }

    /// `close` has begun (or finished): nothing may start any more.
    package var isShuttingDown: Bool {
        switch self {
        case .closing, .closed: return true
        default: return false
        }
    }

    package var isClosed: Bool {
        if case .closed = self { return true }
        return false
    }

    /// The phase, for status and for telling whether a change is one (the service maps it to the wire).
    package var phase: Phase {
        switch activity {
        case .idle: return .idle
        case .hydrating: return .hydrating
        case .paused: return .paused
        case .failed: return .failed
        case .complete: return .complete
        case .closing, .closed: preconditionFailure("activity is never closing or closed")
        }
    }

    /// The error the job shows: why it paused or failed, or why its run is stopping.
    package var error: HydrationError? {
        switch activity {
        case .hydrating(let run): return run.stopReason?.error
        case .paused(let r, _): return r.error
        case .failed(let e, _): return e
        default: return nil
        }
    }

    /// This instance cannot resume: it must be opened again from its durable state (as a restart
    /// would), e.g. after a commit ran out of space (its failed sync may have dropped pages without
    /// a later sync saying so).
    package var needsReopen: Bool {
        switch activity {
        case .paused(_, .reopen), .failed(_, .reopen): return true
        default: return false
        }
    }
}

/// The phases of a job, as status shows them.
public enum JobPhase: String, Sendable, Equatable, CaseIterable {
    case idle, hydrating, paused, complete, failed
}

extension JobState {
    package typealias Phase = JobPhase
}

/// One run of the copier (`start` to the end of `runHydration`).
package struct HydrationRun: Sendable {
    /// Runs are numbered: a stop names the run it stops (`Copier.requestStop`).
    package let id: Int
    package let task: Task<Void, Never>
    /// Set by a stop (`pause`, `close`, a late opener of the source): the run ends paused for it.
    package var stopReason: PauseReason?
    /// The run completed and is letting go of the devices: no export may be attached any more.
    package var releasingDevices = false
}

/// Why a job is paused.
package enum PauseReason: Sendable {
    /// Asked for (`pause`, `close`), or a job paused before it ever ran.
    case requested
    /// The destination, or a commit, ran out of space.
    case noSpace(HydrationError)
    /// A remote source's connection is down; `watch` probes it and resumes the job once it is
    /// back (nil: nobody watches; the user paused, or the job must be reopened).
    case sourceUnavailable(HydrationError, watch: Task<Void, Never>?)
    /// Another process opened a file source whose space is released: releases stopped.
    case sourceOpenedElsewhere(HydrationError)

    package var error: HydrationError? {
        switch self {
        case .requested: return nil
        case .noSpace(let e), .sourceUnavailable(let e, _), .sourceOpenedElsewhere(let e): return e
        }
    }
}

/// How a paused or failed job can go on.
package enum Resumption: Sendable, Equatable {
    /// `start` resumes (or retries) it.
    case inPlace
    /// Only a reopen from its last commit does (`needsReopen`).
    case reopen
}

/// What a complete job still holds open.
package enum CompleteHold: Sendable, Equatable {
    /// Source and destination (a complete job opened from its metadata, until its last releases
    /// are recorded).
    case devices
    /// The destination only: its clone is served.
    case destination
    /// Nothing: the destination can be mounted or used at once.
    case nothing
}
