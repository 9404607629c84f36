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

    func testTheOfflineEvaluatorMatchesAVector() throws {
        let flags = "[{\"key\": \"f\", \"on\": true, \"variants\": {\"a\": \"A\", \"b\": \"B\"}, \"off_variant\": \"b\", " +
            "\"fallthrough\": {\"rollout\": {\"variants\": [{\"variant\": \"a\", \"weight\": 30000}, {\"variant\": \"b\", \"weight\": 70000}]}}}]"
        let evaluator = try VaneEvaluator(flagsJson: flags.replacingOccurrences(of: "\"key\": \"f\"", with: "\"key\": \"checkout\""),
                                          segmentsJson: "[]")
        let result = try evaluator.evaluate(key: "checkout", contextJson: "{\"key\": \"user-1\"}", want: nil)
        XCTAssertEqual(result.bucket, 21999)
        XCTAssertEqual(result.variant, "a")
    }
}
