<?php
/**
 * The Workerman chat as a wsd exec handler, in plain PHP (php-cli; json is built in).
 *
 * Run by wsd with `app = "exec"` and `command = ["php", "examples/handlers/chat.php"]`. The
 * protocol is one JSON object per line each way (docs/handlers.md): wsd writes events to our
 * stdin, we write commands to our stdout, and what we print to stderr goes to wsd's log.
 *
 * The Workerman code it replaces:
 *
 *     $ws_worker->onMessage = function ($connection, $data) use ($ws_worker) {
 *         foreach ($ws_worker->connections as $c) {
 *             $c->send($data);
 *         }
 *     };
 *
 * The migration:
 *
 * - The `onMessage` callback becomes the `message` event: {"event":"message","conn":ID,"data":...}
 *   ("data" is the text, or {"b64":...} for a binary message).
 * - `$connection->send($data)` becomes a `send` command: {"cmd":"send","conn":ID,"data":...}.
 * - Sending to every connection becomes one `broadcast` command: {"cmd":"broadcast","data":...}.
 *   Unlike Workerman's `$ws_worker->connections`, which holds only this process's connections,
 *   a broadcast reaches every connection of the group on every worker.
 *
 * So every text message is relayed unchanged to every client, its sender included; binary
 * messages are ignored. wsd starts one of these per worker process, for all its connections.
 * It reads whatever stdin has, carries out every line, and answers in one write: a busy handler
 * costs one read and one write per batch, not per message. It exits when stdin ends (the
 * worker is stopping).
 */

const JSON_FLAGS = JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE;

/** Appends to $out the commands that $event calls for. */
function handle(array $event, array &$out): void
{
    if (($event['event'] ?? null) === 'message' && is_string($event['data'] ?? null)) {
        $out[] = ['cmd' => 'broadcast', 'data' => $event['data']];
    }
}

/** Writes all of $bytes to stdout, however many writes the pipe takes. */
function write_all(string $bytes): void
{
    while ($bytes !== '') {
        $n = fwrite(STDOUT, $bytes);
        if ($n === false || $n === 0) {
            fwrite(STDERR, "chat.php: stdout is closed\n");
            exit(1);
        }
        $bytes = substr($bytes, $n);
    }
    fflush(STDOUT);
}

function main(): void
{
    stream_set_blocking(STDIN, false);
    $pending = '';
    while (true) {
        $read = [STDIN];
        $write = $except = null;
        if (@stream_select($read, $write, $except, null) === false) {
            continue; // interrupted by a signal
        }
        $chunk = '';
        while (($got = fread(STDIN, 1 << 16)) !== false && $got !== '') {
            $chunk .= $got;
        }
        if ($chunk === '') {
            if (feof(STDIN)) {
                return; // wsd closed our stdin: the worker is stopping
            }
            continue;
        }
        $lines = explode("\n", $pending . $chunk);
        $pending = array_pop($lines);
        $out = [];
        foreach ($lines as $line) {
            if (trim($line) === '') {
                continue;
            }
            $event = json_decode($line, true);
            if (!is_array($event)) {
                fwrite(STDERR, "chat.php: not a JSON object: " . substr($line, 0, 200) . "\n");
                continue;
            }
            handle($event, $out);
        }
        if ($out) {
            write_all(implode('', array_map(fn ($c) => json_encode($c, JSON_FLAGS) . "\n", $out)));
        }
    }
}

main();
