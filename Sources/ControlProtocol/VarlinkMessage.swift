import FoundationEssentials

/// A Varlink method call: `{"method": "iface.Method", "parameters": {...}, "more": true, "oneway": true}`.
///
/// Flags that are `false` or absent are omitted when encoding. `upgrade` is decoded so that the server
/// can refuse it by name; hydrationd never upgrades a connection.
public struct VarlinkCall: Codable, Sendable, Equatable {
    public var method: String
    public var parameters: JSONValue?
    public var oneway: Bool?
    public var more: Bool?
    public var upgrade: Bool?

    public init(method: String, parameters: JSONValue? = nil, oneway: Bool = false, more: Bool = false) {
        self.method = method
        self.parameters = parameters
        self.oneway = oneway ? true : nil
        self.more = more ? true : nil
        self.upgrade = nil
    }

    public init<P: Encodable>(method: String, encoding parameters: P, oneway: Bool = false, more: Bool = false) throws {
        self.init(method: method, parameters: try JSONValue(encoding: parameters), oneway: oneway, more: more)
    }

    public var wantsMore: Bool { more ?? false }
    public var isOneway: Bool { oneway ?? false }

    /// `iface` of `iface.Method` (everything before the last dot); empty when there is no dot.
    public var interfaceName: String {
        guard let dot = method.lastIndex(of: ".") else { return "" }
        return String(method[..<dot])
    }

    /// `Method` of `iface.Method`.
    public var memberName: String {
        guard let dot = method.lastIndex(of: ".") else { return method }
        return String(method[method.index(after: dot)...])
    }

    enum CodingKeys: String, CodingKey { case method, parameters, oneway, more, upgrade }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(method, forKey: .method)
        try c.encodeIfPresent(parameters, forKey: .parameters)
        if oneway == true { try c.encode(true, forKey: .oneway) }
        if more == true { try c.encode(true, forKey: .more) }
        if upgrade == true { try c.encode(true, forKey: .upgrade) }
    }
}

/// A Varlink reply: `{"parameters": {...}, "continues": true}` or `{"error": "iface.Name", "parameters": {...}}`.
public struct VarlinkReply: Codable, Sendable, Equatable {
    public var parameters: JSONValue?
    public var continues: Bool?
    public var error: String?

    public init(parameters: JSONValue? = .emptyObject, continues: Bool = false, error: String? = nil) {
        self.parameters = parameters
        self.continues = continues ? true : nil
        self.error = error
    }

    public init<P: Encodable>(encoding parameters: P, continues: Bool = false) throws {
        self.init(parameters: try JSONValue(encoding: parameters), continues: continues)
    }

    public init(error: VarlinkError) {
        self.init(parameters: .object(error.parameters), continues: false, error: error.name)
    }

    public var isContinued: Bool { continues ?? false }

    /// The error this reply carries, if any.
    public var varlinkError: VarlinkError? {
        guard let error else { return nil }
        return VarlinkError(name: error, parameters: parameters?.objectValue ?? [:])
    }

    /// The reply's parameters decoded into `T`; throws the reply's `VarlinkError` if it is an error.
    public func decodeParameters<T: Decodable>(_ type: T.Type = T.self) throws -> T {
        if let e = varlinkError { throw e }
        return try (parameters ?? .emptyObject).decode(T.self)
    }

    enum CodingKeys: String, CodingKey { case parameters, continues, error }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(parameters ?? .emptyObject, forKey: .parameters)
        if continues == true { try c.encode(true, forKey: .continues) }
        try c.encodeIfPresent(error, forKey: .error)
    }
}
