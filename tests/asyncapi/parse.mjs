// Parse an AsyncAPI document with the official parser (@asyncapi/parser) and print one
// JSON object: {"document": true|false, "diagnostics": [{code, severity, message, path}]}.
// Severity is Spectral's: 0 error, 1 warning, 2 information, 3 hint.
// Used by tests/unit/test_asyncapi_parser.py: `node parse.mjs FILE`.
import { readFile } from "node:fs/promises";
import { Parser } from "@asyncapi/parser";

const text = await readFile(process.argv[2], "utf8");
const { document, diagnostics } = await new Parser().parse(text);
process.stdout.write(
  JSON.stringify({
    document: document !== undefined,
    diagnostics: diagnostics.map((d) => ({
      code: String(d.code),
      severity: d.severity,
      message: d.message,
      path: d.path.join("/"),
    })),
  }) + "\n",
);
