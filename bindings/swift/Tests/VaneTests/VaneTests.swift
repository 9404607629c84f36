// Runs with `swift test` on macOS after build-xcframework.sh, against a server given by
// VANE_ENDPOINT, VANE_MOBILE_KEY and VANE_CA (as bindings/kotlin/run-tests sets them up).
import Foundation
import XCTest
import Vane
import VaneFFI

final class VaneTests: XCTestCase {
    func testABadKeyIsAnAuthError() throws {
        let env = ProcessInfo.processInfo.environment
        guard let endpoint = env["VANE_ENDPOINT"], let caPath = env["VANE_CA"] else {
            throw XCTSkip("no server configured")
        }
        let ca = try String(contentsOfFile: caPath)
        let vane = try Vane(endpoint: endpoint, sdkKey: "vane_mob_00000000000000000000000000000000",
                            caPem: ca, context: "{\"key\": \"u1\"}")
        defer { vane.close() }
        XCTAssertThrowsError(try vane.waitForInitialization(timeoutMs: 20000)) { error in
            guard case VaneError.Auth = error else {
                return XCTFail("expected VaneError.Auth, got \(error)")
            }
        }
    }

    func testATypedContextBuildsItsJson() throws {
        let json = ContextBuilder(key: "u1").string(name: "country", value: "de").number(name: "age", value: 42).build()
        let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        XCTAssertEqual(object?["key"] as? String, "u1")
        XCTAssertEqual(object?["country"] as? String, "de")
        XCTAssertEqual(object?["age"] as? Double, 42)
    }
}
