// An external controller: asks the governor for a run's panic state, then follows WatchEvents until
// a decision that ordered a rollback arrives. Loads the contract's .proto files at run time.
// Usage: node controller.js ADDRESS RUN_ID PROTO_ROOT
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, runId, protoRoot] = process.argv.slice(2);
const definition = protoLoader.loadSync(
  path.join(protoRoot, "tolaria/governor/v1/control_service.proto"),
  { includeDirs: [protoRoot], keepCase: true, longs: String, enums: String, defaults: true }
);
const v1 = grpc.loadPackageDefinition(definition).tolaria.governor.v1;
const client = new v1.ControlService(address, grpc.credentials.createInsecure());
const deadline = setTimeout(() => { console.error("timed out waiting for a rollback event"); process.exit(3); }, 20000);

client.GetPanicState({ run_id: runId }, (err, response) => {
  if (err) { console.error(`GetPanicState failed: ${err.code} ${err.details}`); process.exit(2); }
  const state = response.run;
  const call = client.WatchEvents({ cursor: 0, run_ids: [runId] });
  call.on("data", (event) => {
    const payload = JSON.parse(event.payload_json);
    const decision = payload.decision;
    if (decision && decision.command && decision.command.kind === "rollback") {
      console.log(JSON.stringify({
        state: state.state, timeline: state.timeline, cursor: event.cursor, kind: event.kind,
        punishment_reward: decision.command.punishment_reward, reason: decision.reason,
      }));
      clearTimeout(deadline);
      call.cancel();
      process.exit(0);
    }
  });
  call.on("error", (e) => { if (e.code !== grpc.status.CANCELLED) { console.error(e.details); process.exit(2); } });
});
