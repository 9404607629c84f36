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
///     let vane = try Vane(endpoint: "flags.example.com:7443", sdkKey: mobileKey,
///                         context: "{\"key\": \"user-1\"}", cacheDir: cachesURL.path,
///                         callbackQueue: .main)
///     let status = try await vane.initialize(timeoutMs: 2000)  // .ready, .servingCache, .timedOut
///     if vane.boolValue("new-checkout", defaultValue: false) { ... }
///     let registration = vane.addListener { keys in refresh(keys) }  // until registration.cancel()
public final class Vane: @unchecked Sendable {
    // @unchecked: `closed` and `registrations` are only touched under `lock`; the rest is
    // immutable (`snapshot` locks itself), and the generated client is thread-safe.
    private let client: VaneClient
    private let callbackQueue: DispatchQueue
    private let lock = NSLock()
    private var closed = false
    private var registrations: [Registration] = []
    // The getters read this, kept current by the values each change brings (one crossing per
    // change), instead of crossing into Rust on every call.
    private let snapshot: Snapshot
    private let internalHandle: ListenerHandle

    /// Starts the client; it connects in the background. Throws `VaneError.Config` for a bad
    /// context or CA. Without `caPem` the server's certificate is verified against the
    /// system's trust store (Security framework); with it, against that private CA only.
    public init(
        endpoint: String,
        sdkKey: String,
        caPem: String? = nil,
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
        let client = try VaneClient(config: config)
        let snapshot = Snapshot()
        snapshot.replace(client.allDetails())
        self.client = client
        self.snapshot = snapshot
        self.internalHandle = client.addListener(listener: SnapshotListener(snapshot))
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
        let snapshot = self.snapshot
        return try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                do {
                    let status = try client.initialize(timeoutMs: timeoutMs)
                    // The values may have arrived before the snapshot's listener ran.
                    snapshot.replace(client.allDetails())
                    continuation.resume(returning: status)
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

    /// `key`'s value if `pick` takes it, else `defaultValue` with why; read from the snapshot,
    /// without crossing into Rust.
    private func typed<T: Sendable>(_ key: String, _ defaultValue: T, _ pick: (VaneValue) -> T?) -> Details<T> {
        guard let d = snapshot.get(key) else {
            return Details(value: defaultValue, variant: nil, reason: .error, errorCode: "FLAG_NOT_FOUND")
        }
        guard let value = d.value else {
            return Details(value: defaultValue, variant: nil, reason: .error, errorCode: d.errorCode ?? "GENERAL")
        }
        guard let picked = pick(value) else {
            return Details(value: defaultValue, variant: nil, reason: .error, errorCode: "TYPE_MISMATCH")
        }
        return Details(value: picked, variant: d.variant, reason: d.reason, errorCode: nil)
    }

    public func boolDetails(_ key: String, defaultValue: Bool) -> Details<Bool> {
        return typed(key, defaultValue) { v in
            if case let .bool(value) = v { return value }
            return nil
        }
    }

    public func stringDetails(_ key: String, defaultValue: String) -> Details<String> {
        return typed(key, defaultValue) { v in
            if case let .text(value) = v { return value }
            return nil
        }
    }

    public func intDetails(_ key: String, defaultValue: Int64) -> Details<Int64> {
        return typed(key, defaultValue) { v in
            if case let .number(value) = v, value.rounded() == value, abs(value) < 9e15 { return Int64(value) }
            return nil
        }
    }

    public func doubleDetails(_ key: String, defaultValue: Double) -> Details<Double> {
        return typed(key, defaultValue) { v in
            if case let .number(value) = v { return value }
            return nil
        }
    }

    /// A `json` flag's document, typed (`.object`, `.array`, `.text`, ...); `allFlags()` has it
    /// as JSON text.
    public func jsonDetails(_ key: String, defaultValue: JsonValue) -> Details<JsonValue> {
        return typed(key, defaultValue) { v in
            if case let .json(value) = v { return value }
            return nil
        }
    }

    public func boolValue(_ key: String, defaultValue: Bool) -> Bool {
        return boolDetails(key, defaultValue: defaultValue).value
    }

    public func stringValue(_ key: String, defaultValue: String) -> String {
        return stringDetails(key, defaultValue: defaultValue).value
    }

    public func intValue(_ key: String, defaultValue: Int64) -> Int64 {
        return intDetails(key, defaultValue: defaultValue).value
    }

    public func doubleValue(_ key: String, defaultValue: Double) -> Double {
        return doubleDetails(key, defaultValue: defaultValue).value
    }

    /// A `json` flag's document, typed.
    public func jsonValue(_ key: String, defaultValue: JsonValue) -> JsonValue {
        return jsonDetails(key, defaultValue: defaultValue).value
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

    /// Switch user and wait up to `timeoutMs` until the getters answer for the new context:
    /// true once they do, false if its values did not arrive in time (offline: the previous
    /// user's values are served until they do). Throws for a bad context, a rejected key or a
    /// closed client.
    public func identify(context: String, timeoutMs: UInt64) async throws -> Bool {
        try checkOpen("identify")
        let client = self.client
        let snapshot = self.snapshot
        return try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                do {
                    let done = try client.identifyAndWait(contextJson: context, timeoutMs: timeoutMs)
                    if done { snapshot.replace(client.allDetails()) }
                    continuation.resume(returning: done)
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        }
    }

    /// `identify(context:timeoutMs:)` with a typed context.
    public func identify(context: ContextBuilder, timeoutMs: UInt64) async throws -> Bool {
        return try await identify(context: context.build(), timeoutMs: timeoutMs)
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
        let handle = client.addListener(listener: ClosureListener(onChange, queue: callbackQueue, snapshot: snapshot))
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
        internalHandle.cancel()
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

/// A value with how it was decided: the value (or the caller's default), the variant, the
/// reason, and OpenFeature's error code when the default was served.
public struct Details<T: Sendable>: Sendable {
    public let value: T
    public let variant: String?
    public let reason: Reason
    public let errorCode: String?
}

/// The values the getters read, replaced or patched by each `FlagUpdate`.
final class Snapshot: @unchecked Sendable {
    // @unchecked: `values` is only touched under `lock`.
    private let lock = NSLock()
    private var values: [String: FlagDetails] = [:]

    func get(_ key: String) -> FlagDetails? {
        lock.lock()
        defer { lock.unlock() }
        return values[key]
    }

    func replace(_ all: [FlagDetails]) {
        var fresh: [String: FlagDetails] = [:]
        for d in all {
            fresh[d.key] = d
        }
        lock.lock()
        values = fresh
        lock.unlock()
    }

    func apply(_ update: FlagUpdate) {
        if update.complete {
            return replace(update.changed)
        }
        lock.lock()
        for d in update.changed {
            values[d.key] = d
        }
        for key in update.removed {
            values.removeValue(forKey: key)
        }
        lock.unlock()
    }
}

/// Keeps the snapshot current.
final class SnapshotListener: FlagListener, Sendable {
    private let snapshot: Snapshot

    init(_ snapshot: Snapshot) {
        self.snapshot = snapshot
    }

    func onFlagsChanged(update: FlagUpdate) {
        snapshot.apply(update)
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

/// Adapts a closure to the generated listener protocol: the snapshot is patched first, so the
/// callback, dispatched to `queue`, reads the new values.
final class ClosureListener: FlagListener, Sendable {
    private let onChange: @Sendable ([String]) -> Void
    private let queue: DispatchQueue
    private let snapshot: Snapshot

    init(_ onChange: @escaping @Sendable ([String]) -> Void, queue: DispatchQueue, snapshot: Snapshot) {
        self.onChange = onChange
        self.queue = queue
        self.snapshot = snapshot
    }

    func onFlagsChanged(update: FlagUpdate) {
        snapshot.apply(update)
        let keys = (update.changed.map { $0.key } + update.removed).sorted()
        let onChange = self.onChange
        queue.async {
            onChange(keys)
        }
    }
}
