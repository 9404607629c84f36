// The idiomatic Swift face of the Vane SDK. Everything delegates to the generated bindings
// (module VaneFFI), which call the Rust client core.
//
// Threading: getters never block (they read memory). `initialize` is async; `close` blocks
// briefly (not on the main thread). Listener callbacks run one at a time on the SDK's callback
// queue ("dev.vane.sdk.callbacks"), or on the queue given as `callbackQueue` (`.main` for UI
// code).
import Foundation
import VaneFFI

/// A Vane client for one user (context).
///
///     let vane = try Vane(endpoint: "flags.example.com:7443", sdkKey: mobileKey, caPem: caPem,
///                         context: "{\"key\": \"user-1\"}", cacheDir: cachesURL.path,
///                         callbackQueue: .main)
///     let status = try await vane.initialize(timeoutMs: 2000)  // .ready, .servingCache, .timedOut
///     if vane.boolValue("new-checkout", defaultValue: false) { ... }
///     let registration = vane.addListener { keys in refresh(keys) }  // until registration.cancel()
public final class Vane: @unchecked Sendable {
    // @unchecked: `closed` and `registrations` are only touched under `lock`; the rest is
    // immutable, and the generated client is thread-safe.
    private let client: VaneClient
    private let callbackQueue: DispatchQueue
    private let lock = NSLock()
    private var closed = false
    private var registrations: [Registration] = []

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
        httpEndpoint: String? = nil,
        callbackQueue: DispatchQueue? = nil
    ) throws {
        self.callbackQueue = callbackQueue ?? DispatchQueue(label: "dev.vane.sdk.callbacks")
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

    private var isClosed: Bool {
        lock.lock()
        defer { lock.unlock() }
        return closed
    }

    private func checkOpen(_ what: String) throws {
        if isClosed {
            throw VaneError.Closed(reason: "\(what) after close()")
        }
    }

    /// Waits up to `timeoutMs` for live values and says how it went: `.ready`, `.servingCache`
    /// (offline, the cache's values are served) or `.timedOut` (defaults until values arrive).
    /// Being offline is not an error; a rejected key is (`VaneError.Auth`).
    public func initialize(timeoutMs: UInt64) async throws -> InitStatus {
        try checkOpen("initialize")
        let client = self.client
        return try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                do {
                    continuation.resume(returning: try client.initialize(timeoutMs: timeoutMs))
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    /// Whether live values have arrived.
    public var isInitialized: Bool {
        return !isClosed && client.isInitialized()
    }

    /// Blocks until live flags arrived; throws `VaneError.Network` on timeout, `VaneError.Auth`
    /// for a rejected key. Prefer `initialize`, which does not throw for being offline.
    public func waitForInitialization(timeoutMs: UInt64) throws {
        try checkOpen("waitForInitialization")
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

    /// Switch user; the values that differ arrive shortly and listeners are told. A context
    /// without a `key` is anonymous: it gets this device's anonymous key (kept in `cacheDir`).
    public func identify(context: String) throws {
        try checkOpen("identify")
        try client.identify(contextJson: context)
    }

    /// Switch user, with a typed context: `ContextBuilder(key: "user-2").string(name: "country", value: "fr")`.
    public func identify(context: ContextBuilder) throws {
        try identify(context: context.build())
    }

    /// The targeting key in use: the context's own, or this device's anonymous key.
    public var contextKey: String? {
        return client.contextKey()
    }

    /// Calls `onChange` with the keys of changed flags, on the callback queue. The listener stays
    /// registered until the registration is cancelled or the client closes: letting the
    /// registration go does not unregister it. After `close()` it does nothing.
    @discardableResult
    public func addListener(_ onChange: @escaping @Sendable ([String]) -> Void) -> Registration {
        let handle = client.addListener(listener: ClosureListener(onChange, queue: callbackQueue))
        let registration = Registration(handle)
        lock.lock()
        let wasClosed = closed
        if !wasClosed {
            registrations.append(registration)
        }
        lock.unlock()
        if wasClosed {
            registration.cancel()
        }
        return registration
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

    /// Where the client stands and why: `cause` is `.connecting`, `.connected` (see `transport`),
    /// `.offline` (`lastError` says why; it keeps trying), `.suspended`, `.unauthorized` (the key
    /// is unknown or revoked: it stops, values held are still served) or `.stopped`.
    public var status: VaneStatus {
        return client.status()
    }

    /// The status now, then every change, until the iteration ends.
    public func statusUpdates() -> AsyncStream<VaneStatus> {
        let client = self.client
        return AsyncStream { continuation in
            let handle = client.addStatusListener(listener: ClosureStatusListener { status in
                continuation.yield(status)
            })
            continuation.onTermination = { _ in
                handle.cancel()
            }
        }
    }

    /// Call from your network path monitor.
    public func setNetworkAvailable(_ available: Bool) {
        client.setNetworkAvailable(available: available)
    }

    /// Call when the app enters the foreground (true) or background (false).
    public func setForeground(_ foreground: Bool) {
        client.setForeground(foreground: foreground)
    }

    /// Closes the connection and stops listeners. Blocks briefly. Idempotent; afterwards the
    /// throwing calls throw `VaneError.Closed` and the getters return their defaults.
    public func close() {
        lock.lock()
        let first = !closed
        closed = true
        let stopping = registrations
        registrations = []
        lock.unlock()
        guard first else { return }
        for registration in stopping {
            registration.cancel()
        }
        client.shutdown()
    }
}

extension Vane {
    /// Sends the SDK's log lines at `level` and above to `log` (level, origin, message), e.g.
    /// `Vane.setLogger(level: .info) { level, _, message in os_log("%{public}@", message) }`.
    /// Called on the thread that logged. Until one is set, the SDK's logs go nowhere.
    @discardableResult
    public static func setLogger(level: LogLevel = .warn,
                                 _ log: @escaping @Sendable (LogLevel, String, String) -> Void) -> Bool {
        return setLogSink(sink: ClosureLogSink(log), level: level)
    }
}

/// Adapts a closure to the generated log sink protocol.
final class ClosureLogSink: LogSink, Sendable {
    private let handler: @Sendable (LogLevel, String, String) -> Void

    init(_ handler: @escaping @Sendable (LogLevel, String, String) -> Void) {
        self.handler = handler
    }

    func log(level: LogLevel, target: String, message: String) {
        handler(level, target, message)
    }
}

/// A registered listener: it stays registered until `cancel()` or the client closes.
public final class Registration: Sendable {
    private let handle: ListenerHandle

    init(_ handle: ListenerHandle) {
        self.handle = handle
    }

    /// Stops the callbacks. Idempotent.
    public func cancel() {
        handle.cancel()
    }
}

/// Adapts a closure to the generated status listener protocol.
final class ClosureStatusListener: StatusListener, Sendable {
    private let handler: @Sendable (VaneStatus) -> Void

    init(_ handler: @escaping @Sendable (VaneStatus) -> Void) {
        self.handler = handler
    }

    func onStatus(status: VaneStatus) {
        handler(status)
    }
}

/// Adapts a closure to the generated listener protocol: each callback is dispatched to `queue`.
final class ClosureListener: FlagListener, Sendable {
    private let onChange: @Sendable ([String]) -> Void
    private let queue: DispatchQueue

    init(_ onChange: @escaping @Sendable ([String]) -> Void, queue: DispatchQueue) {
        self.onChange = onChange
        self.queue = queue
    }

    func onFlagsChanged(keys: [String]) {
        let onChange = self.onChange
        queue.async {
            onChange(keys)
        }
    }
}
