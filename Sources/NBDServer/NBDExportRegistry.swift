import Synchronization

/// Where the server finds exports: `NBD_OPT_LIST` lists `exports()`, `NBD_OPT_GO`/`INFO`/
/// `EXPORT_NAME` and the meta-context options look a name up (the empty name is the default export).
public protocol NBDExportLookup: Sendable {
    func export(named name: String) async -> (any NBDExport)?
    func exports() async -> [any NBDExport]
}

/// A thread-safe set of exports by name, with an optional default export for the empty name.
/// Removing an export does not affect connections already using it (see `NBDServer.disconnect`).
public final class NBDExportRegistry: NBDExportLookup, Sendable {
    private struct State {
        var exports: [String: any NBDExport] = [:]
        var order: [String] = []
        var defaultName: String?
    }
    private let state = Mutex(State())

    public init(_ exports: [any NBDExport] = [], defaultExport: String? = nil) {
        state.withLock { st in
            for e in exports where st.exports[e.name] == nil {
                st.exports[e.name] = e
                st.order.append(e.name)
            }
            st.defaultName = defaultExport
        }
    }

    public struct DuplicateName: Error, CustomStringConvertible {
        public var name: String
        public var description: String { "an export named '\(name)' already exists" }
    }

    /// Adds `export`; throws if the name is taken.
    public func add(_ export: any NBDExport) throws(DuplicateName) {
        let added = state.withLock { st in
            if st.exports[export.name] != nil { return false }
            st.exports[export.name] = export
            st.order.append(export.name)
            return true
        }
        if !added { throw DuplicateName(name: export.name) }
    }

    /// Removes and returns the export called `name`.
    @discardableResult
    public func remove(_ name: String) -> (any NBDExport)? {
        state.withLock { st in
            st.order.removeAll { $0 == name }
            return st.exports.removeValue(forKey: name)
        }
    }

    /// The export served for the empty name (nil: the empty name is unknown unless an export has it).
    public var defaultExport: String? {
        get { state.withLock { $0.defaultName } }
        set { state.withLock { $0.defaultName = newValue } }
    }

    public func export(named name: String) async -> (any NBDExport)? {
        state.withLock { st in
            if let e = st.exports[name] { return e }
            if name.isEmpty, let d = st.defaultName { return st.exports[d] }
            return nil
        }
    }

    public func exports() async -> [any NBDExport] {
        state.withLock { st in st.order.compactMap { st.exports[$0] } }
    }
}
