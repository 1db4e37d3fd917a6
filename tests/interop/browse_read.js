// An independent OPC-UA client (node-opcua) for tests/host/test_opcua_interop.py.
// Usage: node browse_read.js '<json options>'; prints one line "EDGELINE_RESULT <json>" on stdout.
// Options: endpoint, security ("None" | "Basic256Sha256"), pkiDir, certFile, keyFile,
// applicationUri, serverCertFile (DER, trusted before connecting), user, password, paths.
"use strict";
const fs = require("fs");
const {
  OPCUAClient,
  MessageSecurityMode,
  SecurityPolicy,
  UserTokenType,
  AttributeIds,
  BrowseDirection,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

async function browseNames(session, nodeId) {
  const res = await session.browse({
    nodeId,
    browseDirection: BrowseDirection.Forward,
    referenceTypeId: "HierarchicalReferences",
    includeSubtypes: true,
    resultMask: 63,
  });
  return res.references.map((r) => ({
    name: r.browseName.name,
    nodeId: r.nodeId.toString(),
    typeDefinition: r.typeDefinition.toString(),
  }));
}

async function main() {
  const o = JSON.parse(process.argv[2]);
  const secure = o.security === "Basic256Sha256";
  const certificateManager = new OPCUACertificateManager({
    rootFolder: o.pkiDir,
    automaticallyAcceptUnknownCertificate: !secure,
    disableFileWatchers: true,
  });
  await certificateManager.initialize();
  if (o.serverCertFile) {
    // Trust the gateway's certificate explicitly: no blanket acceptance on this side either.
    await certificateManager.trustCertificate(fs.readFileSync(o.serverCertFile));
  }
  const client = OPCUAClient.create({
    applicationName: "edgeline-interop",
    applicationUri: o.applicationUri,
    clientCertificateManager: certificateManager,
    certificateFile: o.certFile,
    privateKeyFile: o.keyFile,
    securityMode: secure ? MessageSecurityMode.SignAndEncrypt : MessageSecurityMode.None,
    securityPolicy: secure ? SecurityPolicy.Basic256Sha256 : SecurityPolicy.None,
    endpointMustExist: false,
    connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
  });
  const out = { ok: false };
  try {
    await client.connect(o.endpoint);
    const identity = o.user
      ? { type: UserTokenType.UserName, userName: o.user, password: o.password }
      : { type: UserTokenType.Anonymous };
    const session = await client.createSession(identity);
    try {
      const nsArray = await session.read({ nodeId: "ns=0;i=2255", attributeId: AttributeIds.Value });
      const ns = nsArray.value.value.indexOf("urn:edgeline:gateway");
      out.namespaceIndex = ns;
      out.objects = await browseNames(session, "ns=0;i=85");
      out.site = await browseNames(session, `ns=${ns};s=s1`);
      out.line = await browseNames(session, `ns=${ns};s=s1/l1`);
      out.machine = await browseNames(session, `ns=${ns};s=s1/l1/m1`);
      out.values = {};
      for (const p of o.paths) {
        const dv = await session.read({ nodeId: `ns=${ns};s=${p}`, attributeId: AttributeIds.Value });
        out.values[p] = { value: dv.value.value, status: dv.statusCode.name };
      }
      out.ok = true;
    } finally {
      await session.close();
    }
  } catch (err) {
    out.error = String(err && err.message ? err.message : err);
  } finally {
    await client.disconnect();
  }
  process.stdout.write("EDGELINE_RESULT " + JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stdout.write("EDGELINE_RESULT " + JSON.stringify({ ok: false, error: String(err) }) + "\n");
  process.exit(1);
});
