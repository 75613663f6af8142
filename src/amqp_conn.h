/* amqp_conn.h — an AMQP 0-9-1 connection watched by a libuv loop: rabbitmq-c for the handshake and the codec, our own non-blocking socket I/O.
 *
 * No Lua here.  rabbitmq-c (Debian's librabbitmq) is a blocking client: its
 * reads and writes wait in poll(2) and would stall every task on the loop.
 * So it is used only where waiting is harmless or absent:
 *   - tide__amqp_open: DNS, TCP connect and the handshake (connection.start
 *     ... open-ok), blocking, bounded by a timeout: call it on a thread
 *     of its own (the binding starts one per connect), never on the loop
 *     thread;
 *   - its codec: frames are decoded by amqp_handle_input from bytes that we
 *     read, and methods and properties encoded by amqp_encode_method and
 *     amqp_encode_properties into bytes that we write.
 * After the handshake the socket is non-blocking and belongs to the loop: a
 * uv_poll_t reads whenever bytes arrive (and writes what the socket could
 * not take at once, when it can); a uv_timer_t sends heartbeats and notices
 * a broker that went silent.  Nothing here ever waits.
 *
 * Writes are queued (bounded by TIDE_AMQP_OUT_MAX) and flushed by a
 * uv_prepare_t after the tick that queued them, before the loop polls, so
 * every ack made during one tick leaves in one write(2); only bytes the
 * socket refuses wait for it to become writable.  A broker that stops
 * reading (a resource alarm blocks publishers) fills the queue, and sending
 * fails with an error, not a hang.
 *
 * Memory: a decoded method, the properties of a message and its body point
 * into rabbitmq-c's channel pools; an event stays valid until the next call
 * of tide__amqp_next on the same connection, which releases them.
 *
 * Only call these from the loop thread, except tide__amqp_open.
 */
#ifndef TIDE_AMQP_CONN_H
#define TIDE_AMQP_CONN_H

#include <stddef.h>
#include <stdint.h>

#include <amqp.h>
#include <amqp_framing.h>
#include <uv.h>

#define TIDE_AMQP_OUT_MAX (256u << 20)    /* bytes queued for the socket at most */
#define TIDE_AMQP_BODY_MAX (512u << 20)   /* largest message body accepted     */

typedef struct tide__amqp tide__amqp;

typedef struct tide__amqp_config {
  const char *host;
  int port;
  const char *vhost, *user, *password;
  const char *name;         /* connection_name, shown by the management tools */
  int heartbeat;            /* seconds asked for (the broker may lower it); 0: none */
  int timeout_ms;           /* connect and handshake, each */
} tide__amqp_config;

/* One event read from the connection.  For a message (has_content), `method`
 * is basic.deliver, basic.return or basic.get-ok and props/body its content. */
typedef struct tide__amqp_event {
  amqp_channel_t channel;
  amqp_method_t method;
  int has_content;
  amqp_basic_properties_t *props;
  amqp_bytes_t body;
} tide__amqp_event;

/* Called on the loop when the connection has bytes to read or was lost:
 * call tide__amqp_next until it returns 0 or -1. */
typedef void (*tide__amqp_ready_cb)(tide__amqp *c, void *data);

/* Connects and logs in; blocks up to about 2 * cfg->timeout_ms.  Any thread
 * but the loop's.  Returns NULL and a message in err when it fails. */
tide__amqp *tide__amqp_open(const tide__amqp_config *cfg, char *err, size_t errlen);

/* Hands the connection to the loop (loop thread): starts reading, writing
 * and heartbeats.  0, or a UV_E* code: then c is closed and freed. */
int tide__amqp_attach(tide__amqp *c, uv_loop_t *loop, tide__amqp_ready_cb ready, void *data);

/* The next event: 1 (ev filled), 0 (nothing more for now), -1 (the
 * connection is lost: tide__amqp_error says why; it stays lost). */
int tide__amqp_next(tide__amqp *c, tide__amqp_event *ev);

/* Queues a method frame; 0, or -1 (lost, or the output queue is full:
 * tide__amqp_error says which; a full queue also loses the connection). */
int tide__amqp_send_method(tide__amqp *c, amqp_channel_t ch, amqp_method_number_t id, void *decoded);

/* Queues basic.ack for `tag` (with `multiple`: every delivery of the
 * channel up to it); as tide__amqp_send_method.  Consecutive acks with
 * `multiple` on one channel that are still queued whole become one frame. */
int tide__amqp_send_ack(tide__amqp *c, amqp_channel_t ch, uint64_t tag, int multiple);

/* Queues a content header and body frames (after a basic.publish). */
int tide__amqp_send_content(tide__amqp *c, amqp_channel_t ch, const amqp_basic_properties_t *props,
                            const void *body, size_t len);

/* Queues basic.publish with its content, whole or not at all: 0; -1 (lost,
 * as tide__amqp_send_method); -2 when the method or the properties cannot
 * be encoded (they must fit in one frame): then nothing of it stays queued,
 * the connection goes on, and tide__amqp_send_error says why. */
int tide__amqp_send_publish(tide__amqp *c, amqp_channel_t ch, const amqp_basic_publish_t *m,
                            const amqp_basic_properties_t *props, const void *body, size_t len);

/* Why the last send returned -2 (nothing was queued: the connection goes on). */
const char *tide__amqp_send_error(const tide__amqp *c);

/* Why the connection is lost ("" while it is not). */
const char *tide__amqp_error(const tide__amqp *c);

/* Negotiated values, and bytes waiting to be written. */
int tide__amqp_heartbeat(const tide__amqp *c);
int tide__amqp_frame_max(const tide__amqp *c);
int tide__amqp_channel_max(const tide__amqp *c);
size_t tide__amqp_pending(const tide__amqp *c);

/* Says connection.close when the connection is healthy (a best-effort,
 * non-blocking write), closes the socket and frees c (once its handles are
 * closed, when attached).  c must not be used afterwards. */
void tide__amqp_close(tide__amqp *c);

#endif
