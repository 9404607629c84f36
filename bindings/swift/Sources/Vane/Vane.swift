// The idiomatic Swift face of the Vane SDK. Everything delegates to the generated bindings
// (module VaneFFI), which call the Rust client core.
//
// Threading: getters never block (they read memory). `waitForInitialization` and `close` block
// the calling thread; do not call them on the main thread. Listener callbacks arrive on the
// SDK's background thread ("vane-sdk"); hop to the main actor yourself.
import Foundation
import VaneFFI

/// A Vane client for one user (context).
///
///     let vane = try Vane(endpoint: "flags.example.com:7443", sdkKey: mobileKey, caPem: caPem,
///                         context: "{\"key\": \"user-1\"}", cacheDir: cachesURL.path)
///     if vane.boolValue("new-checkout", defaultValue: false) { ... }
///     let handle = vane.addListener { keys in DispatchQueue.main.async { refresh(keys) } }
public final class Vane {
    private let client: VaneClient

    /// Starts the client; it connects in the background. Throws `VaneError.Config` for a bad
    /// context or CA.
    public init(
        endpoint: String,
        sdkKey: String,
        caPem: String,
        context: String,
        cacheDir: String? = nil,
        transport: TransportPreference? = nil,
        serverName: String? = nil,
        httpEndpoint: String? = nil
    ) throws {
        let config = VaneConfig(
            endpoint: endpoint,
            sdkKey: sdkKey,
            caPem: caPem,
            contextJson: context,
            cacheDir: cacheDir,
            transport: transport,
            serverName: serverName,
            httpEndpoint: httpEndpoint
        )
        client = try VaneClient(config: config)
    }

    /// Blocks until live flags arrived; throws `VaneError.Auth` for a rejected key.
    public func waitForInitialization(timeoutMs: UInt64) throws {
        try client.waitForInitialization(timeoutMs: timeoutMs)
    }

    public func boolValue(_ key: String, defaultValue: Bool) -> Bool {
        return client.boolValue(key: key, defaultValue: defaultValue)
    }

    public func stringValue(_ key: String, defaultValue: String) -> String {
        return client.stringValue(key: key, defaultValue: defaultValue)
    }

    public func intValue(_ key: String, defaultValue: Int64) -> Int64 {
        return client.intValue(key: key, defaultValue: defaultValue)
    }

    public func doubleValue(_ key: String, defaultValue: Double) -> Double {
        return client.doubleValue(key: key, defaultValue: defaultValue)
    }

    /// The value as JSON text.
    public func jsonValue(_ key: String, defaultValue: String) -> String {
        return client.jsonValue(key: key, defaultValue: defaultValue)
    }

    public func boolDetails(_ key: String, defaultValue: Bool) -> BoolDetails {
        return client.boolDetails(key: key, defaultValue: defaultValue)
    }

    public func stringDetails(_ key: String, defaultValue: String) -> StringDetails {
        return client.stringDetails(key: key, defaultValue: defaultValue)
    }

    public func intDetails(_ key: String, defaultValue: Int64) -> IntDetails {
        return client.intDetails(key: key, defaultValue: defaultValue)
    }

    public func doubleDetails(_ key: String, defaultValue: Double) -> DoubleDetails {
        return client.doubleDetails(key: key, defaultValue: defaultValue)
    }

    public func jsonDetails(_ key: String, defaultValue: String) -> JsonDetails {
        return client.jsonDetails(key: key, defaultValue: defaultValue)
    }

    /// Every flag: key to value as JSON text.
    public func allFlags() -> [String: String] {
        return client.allFlags()
    }

    /// Switch user; the values that differ arrive shortly and listeners are told.
    public func identify(context: String) throws {
        try client.identify(contextJson: context)
    }

    /// Calls `onChange` with the keys of changed flags. Keep the handle; `cancel()` it (or let it
    /// go) to stop.
    public func addListener(_ onChange: @escaping ([String]) -> Void) -> ListenerHandle {
        return client.addListener(listener: ClosureListener(onChange))
    }

    /// The keys of changed flags as an async sequence; ending the iteration unregisters.
    public func changes() -> AsyncStream<[String]> {
        return AsyncStream { continuation in
            let handle = self.addListener { keys in
                continuation.yield(keys)
            }
            continuation.onTermination = { _ in
                handle.cancel()
            }
        }
    }

    public var connectionState: ConnectionState {
        return client.connectionState()
    }

    public var transport: Transport? {
        return client.transport()
    }

    /// Call from your network path monitor.
    public func setNetworkAvailable(_ available: Bool) {
        client.setNetworkAvailable(available: available)
    }

    /// Call when the app enters the foreground (true) or background (false).
    public func setForeground(_ foreground: Bool) {
        client.setForeground(foreground: foreground)
    }

    /// Closes the connection and stops listeners. Blocks briefly.
    public func close() {
        client.shutdown()
    }
}

/// Adapts a closure to the generated listener protocol.
final class ClosureListener: FlagListener {
    private let onChange: ([String]) -> Void

    init(_ onChange: @escaping ([String]) -> Void) {
        self.onChange = onChange
    }

    func onFlagsChanged(keys: [String]) {
        onChange(keys)
    }
}
