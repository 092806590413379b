#!/usr/bin/env node
// Refine an estimator's poses with a posefix server, from Node.js.
//
//   node refine.js --image 000000000785.jpg --results results.json [--image-id 785]
//                  [--target 127.0.0.1:50051] [--timeout-ms 10000] [--proto ../../proto/posefix/v1/posefix.proto]
//
// Reads the image file and the COCO keypoint results (a JSON list of {"image_id", "keypoints":
// [x, y, score] * 17, "score", "bbox"?}) of that image, sends them to the server's RefinePose and
// prints the refined results as JSON on stdout: the same entries with each keypoint's score replaced
// by the refiner's confidence. The .proto is loaded at run time: no generated code. The image id
// defaults to the number in the image's file name (COCO's 000000000785.jpg is 785).
// Exit status: 0 on success, 1 when the call fails (status and details on stderr), 2 for bad arguments.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const DEFAULT_PROTO = path.join(__dirname, "..", "..", "proto", "posefix", "v1", "posefix.proto");

function parseArgs(argv) {
  const args = { target: "127.0.0.1:50051", timeoutMs: 10000, proto: DEFAULT_PROTO };
  const names = { "--target": "target", "--image": "image", "--results": "results", "--image-id": "imageId",
                  "--timeout-ms": "timeoutMs", "--proto": "proto" };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (!key || i + 1 >= argv.length) throw new Error(`unknown or incomplete argument ${argv[i]}`);
    args[key] = argv[i + 1];
  }
  if (!args.image || !args.results) throw new Error("--image and --results are required");
  if (args.imageId === undefined) {
    const digits = path.basename(args.image).match(/\d+/);
    if (!digits) throw new Error("--image-id is required: the image's file name holds no number");
    args.imageId = digits[0];
  }
  args.imageId = Number(args.imageId);
  args.timeoutMs = Number(args.timeoutMs);
  return args;
}

function loadService(protoPath) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).posefix.v1.PoseRefiner;
}

// A COCO result → a Person message: keypoints [x, y, score] * 17 in image pixels, box and score kept.
function toPerson(result) {
  const kp = result.keypoints;
  if (!Array.isArray(kp) || kp.length !== 51) throw new Error(`image ${result.image_id}: keypoints must hold 51 numbers`);
  const person = { keypoints: [] };
  for (let j = 0; j < kp.length; j += 3) person.keypoints.push({ x: kp[j], y: kp[j + 1], score: kp[j + 2] });
  if (Array.isArray(result.bbox) && result.bbox.length === 4) {
    const [x, y, width, height] = result.bbox;
    person.box = { x, y, width, height };
  }
  if (typeof result.score === "number") person.score = result.score;
  return person;
}

function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`refine.js: error: ${e.message}\n`);
    process.exit(2);
  }
  const results = JSON.parse(fs.readFileSync(args.results, "utf8")).filter((r) => r.image_id === args.imageId);
  const request = {
    image: { encoded: fs.readFileSync(args.image) },
    format: "KEYPOINT_FORMAT_COCO_17",
    persons: results.map(toPerson),
  };
  const PoseRefiner = loadService(args.proto);
  const client = new PoseRefiner(args.target, grpc.credentials.createInsecure());
  client.RefinePose(request, { deadline: Date.now() + args.timeoutMs }, (err, response) => {
    client.close();
    if (err) {
      process.stderr.write(`refine.js: ${grpc.status[err.code]}: ${err.details}\n`);
      process.exit(1);
    }
    const refined = response.persons.map((person, i) => ({
      ...results[i],
      keypoints: person.keypoints.flatMap((k) => [k.x, k.y, k.confidence]),
    }));
    process.stdout.write(JSON.stringify(refined) + "\n");
  });
}

main();
