// The daemon's entry point lives in HydrationService (DaemonCommand); this file stays thin.
print("hydrationd: not yet wired")
