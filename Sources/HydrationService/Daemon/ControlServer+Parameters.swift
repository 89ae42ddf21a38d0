import ControlProtocol
import Foundation

// Decoding a call's parameters, and naming what is wrong with them.
extension ControlServer {
    /// Decodes `call.parameters` as `P`, rejecting unknown, missing or ill-typed parameters with
    /// `org.varlink.service.InvalidParameter` naming the parameter.
    static func decodeParameters<P: VarlinkParameters>(_ call: VarlinkCall, as type: P.Type) throws(VarlinkError) -> P {
        let object: [String: JSONValue]
        switch call.parameters {
        case nil, .null?: object = [:]
        case .object(let o)?: object = o
        default: throw .serviceInvalidParameter("parameters")
        }
        if let unknown = object.keys.sorted().first(where: { !P.parameterNames.contains($0) }) {
            throw .serviceInvalidParameter(unknown)
        }
        do {
            return try JSONValue.object(object).decode(P.self)
        } catch let DecodingError.keyNotFound(key, ctx) {
            throw .serviceInvalidParameter(path(ctx.codingPath + [key]))
        } catch let DecodingError.typeMismatch(_, ctx) {
            throw .serviceInvalidParameter(path(ctx.codingPath))
        } catch let DecodingError.valueNotFound(_, ctx) {
            throw .serviceInvalidParameter(path(ctx.codingPath))
        } catch let DecodingError.dataCorrupted(ctx) where !ctx.codingPath.isEmpty {
            throw .serviceInvalidParameter(path(ctx.codingPath))
        } catch {
            throw .serviceInvalidParameter(culprit(in: object, as: P.self) ?? "parameters")
        }
    }

    /// For failures the decoder reports without a coding path (a number out of range for its field,
    /// e.g. negative for an unsigned one): the numeric parameter whose replacement by 0 removes the
    /// pathless failure.
    private static func culprit<P: VarlinkParameters>(in object: [String: JSONValue], as type: P.Type) -> String? {
        for (key, value) in object.sorted(by: { $0.key < $1.key }) {
            switch value {
            case .int, .uint, .double: break
            default: continue
            }
            var probe = object
            probe[key] = .int(0)
            do {
                _ = try JSONValue.object(probe).decode(P.self)
                return key
            } catch let DecodingError.dataCorrupted(ctx) where ctx.codingPath.isEmpty {
                continue
            } catch {
                return key  // a different (located) failure remains: this key was the pathless one
            }
        }
        return nil
    }

    private static func path(_ keys: [any CodingKey]) -> String {
        keys.isEmpty
            ? "parameters" : keys.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
    }

    static func describe(_ error: any Error) -> String {
        switch error {
        case DecodingError.dataCorrupted(let ctx):
            let underlying = (ctx.underlyingError as? NSError)?.debugDescription ?? ""
            return "malformed JSON: \(ctx.debugDescription) \(underlying)".trimmingCharacters(in: .whitespaces)
        case DecodingError.keyNotFound(let key, _):
            return "missing field '\(key.stringValue)'"
        case DecodingError.typeMismatch(_, let ctx):
            return "wrong type for '\(path(ctx.codingPath))'"
        case DecodingError.valueNotFound(_, let ctx):
            return "null for '\(path(ctx.codingPath))'"
        default:
            return "\(error)"
        }
    }
}
