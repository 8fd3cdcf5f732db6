// Starts kinesalite (the Kinesis server the tests use) on loopback only; its CLI would
// listen on every interface. Usage: NODE_PATH=<install>/node_modules node kinesalite.js PORT DIR
// DIR keeps the streams in LevelDB, so a restarted server has them still.
const [port, path] = process.argv.slice(2);
require("kinesalite")({
  path,
  createStreamMs: 0,
  deleteStreamMs: 0,
  updateStreamMs: 0,
  shardLimit: 1000,
}).listen(Number(port), "127.0.0.1", () => console.log(`kinesalite on 127.0.0.1:${port}`));
