// Validates Kubernetes custom resources against their CRD schemas, offline, dispatching on
// apiVersion and kind across the packages below: Istio (VirtualService, DestinationRule, ...),
// cert-manager (Certificate, Issuer, ...) and the Prometheus Operator (ServiceMonitor, ...).
//
// stdin: a JSON array of objects. stdout: one JSON document
//   {"ok": bool, "results": [{"index", "apiVersion", "kind", "name", "ok", "errors": [...]}]}
// Exit status: 0 when every object is valid, 1 when any is not (an unknown apiVersion/kind is
// an error), 2 when stdin is not a JSON array.
//
// Beyond the package's schemas (which accept unknown fields and nulls), this also rejects what
// the API server would: a null value anywhere (CRD schemas here are not nullable), and a
// metadata.name / metadata.namespace that is not a DNS name.
import * as certManager from "@kubernetes-models/cert-manager";
import * as istio from "@kubernetes-models/istio";
import * as prometheusOperator from "@kubernetes-models/prometheus-operator";

// Each package exports {group: {version: {Kind: class}}}.
const PACKAGES = {
  "@kubernetes-models/istio": istio,
  "@kubernetes-models/cert-manager": certManager,
  "@kubernetes-models/prometheus-operator": prometheusOperator,
};

const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;

// "networking.istio.io/v1 VirtualService" -> class, for every class the packages export. Two
// packages exporting one apiVersion/kind would make the dispatch ambiguous: refused.
function registry() {
  const classes = new Map();
  const owners = new Map();
  for (const [name, pkg] of Object.entries(PACKAGES)) {
    for (const group of Object.values(pkg)) {
      for (const version of Object.values(group)) {
        for (const cls of Object.values(version)) {
          if (typeof cls === "function" && cls.apiVersion && cls.kind) {
            const key = `${cls.apiVersion} ${cls.kind}`;
            if (owners.has(key) && owners.get(key) !== name) {
              throw new Error(`${key} is exported by both ${owners.get(key)} and ${name}`);
            }
            owners.set(key, name);
            classes.set(key, cls);
          }
        }
      }
    }
  }
  return classes;
}

function nulls(value, path, found) {
  if (value === null) {
    found.push(`${path || "/"} is null`);
  } else if (Array.isArray(value)) {
    value.forEach((item, i) => nulls(item, `${path}/${i}`, found));
  } else if (typeof value === "object") {
    for (const [key, item] of Object.entries(value)) nulls(item, `${path}/${key}`, found);
  }
  return found;
}

function check(classes, object) {
  if (object === null || typeof object !== "object" || Array.isArray(object)) {
    return ["not an object"];
  }
  const cls = classes.get(`${object.apiVersion} ${object.kind}`);
  if (!cls) {
    return [`unknown apiVersion/kind '${object.apiVersion} ${object.kind}' (a kind none of ` +
            `${Object.keys(PACKAGES).join(", ")} knows)`];
  }
  const errors = nulls(object, "", []);
  const name = object.metadata?.name;
  if (typeof name !== "string" || name.length > 253 || !DNS_SUBDOMAIN.test(name)) {
    errors.push(`/metadata/name ${JSON.stringify(name)} is not a DNS subdomain`);
  }
  const namespace = object.metadata?.namespace;
  if (namespace !== undefined &&
      (typeof namespace !== "string" || namespace.length > 63 || !DNS_LABEL.test(namespace))) {
    errors.push(`/metadata/namespace ${JSON.stringify(namespace)} is not a DNS label`);
  }
  try {
    new cls(object).validate();
  } catch (error) {
    if (Array.isArray(error.errors) && error.errors.length) {
      for (const e of error.errors) {
        const detail = e.params && Object.keys(e.params).length ? ` ${JSON.stringify(e.params)}` : "";
        errors.push(`${e.instancePath || "/"} ${e.message}${detail}`);
      }
    } else {
      errors.push(String(error?.message ?? error));
    }
  }
  return errors;
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

async function main() {
  let objects;
  try {
    objects = JSON.parse(await readStdin());
  } catch (error) {
    console.log(JSON.stringify({ ok: false, error: `stdin is not JSON: ${error.message}` }));
    return 2;
  }
  if (!Array.isArray(objects)) {
    console.log(JSON.stringify({ ok: false, error: "stdin is not a JSON array of objects" }));
    return 2;
  }
  const classes = registry();
  const results = objects.map((object, index) => {
    const errors = check(classes, object);
    return {
      index,
      apiVersion: object?.apiVersion ?? null,
      kind: object?.kind ?? null,
      name: object?.metadata?.name ?? null,
      ok: errors.length === 0,
      errors,
    };
  });
  const ok = results.every((r) => r.ok);
  console.log(JSON.stringify({ ok, results }, null, 2));
  return ok ? 0 : 1;
}

process.exitCode = await main();
