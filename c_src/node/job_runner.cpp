#include "job_runner.hpp"

#include <algorithm>
#include <sys/uio.h>

#include "etf/decode.hpp"

namespace erpy::node {

using py::GilHold;
using py::PyRef;
using py::PythonError;

namespace {

// A Python thread state kept for the life of a C++ thread, so that taking the GIL there
// is cheap (PyGILState_Ensure on a thread without one creates and destroys one each time).
class ThreadState {
 public:
  ThreadState() : gstate_(PyGILState_Ensure()), saved_(PyEval_SaveThread()) {}
  ~ThreadState() {
    if (!Py_IsInitialized()) return;
    PyEval_RestoreThread(saved_);
    PyGILState_Release(gstate_);
  }
  ThreadState(const ThreadState&) = delete;
  ThreadState& operator=(const ThreadState&) = delete;

 private:
  PyGILState_STATE gstate_;
  PyThreadState* saved_;
};

void ensure_thread_state() {
  thread_local std::optional<ThreadState> ts;
  if (!ts) ts.emplace();
}

// The span of the next term, skipped without building anything.
etf::Bytes skip_term(etf::Reader& r) {
  const std::size_t start = r.pos();
  etf::NullBuilder nb;
  etf::decode_term(r, nb);
  return r.data().subspan(start, r.pos() - start);
}

std::string read_atom(etf::Reader& r) {
  etf::TermBuilder tb;
  etf::Term t = etf::decode_term(r, tb);
  const std::string* a = atom_of(t);
  if (!a) throw WireError("expected an atom");
  return *a;
}

// The spawn options a request names.
void spawn_opts(const etf::Term& opts, bool& monitor, bool& link) {
  if (const auto* l = std::get_if<etf::List>(&opts.v)) {
    for (const auto& o : l->items) {
      if (const std::string* a = atom_of(o)) {
        monitor = monitor || *a == "monitor";
        link = link || *a == "link";
      }
    }
  }
}

thread_local std::size_t t_result_limit = 0;
thread_local bool t_result_binary = false;

// Appends `value` as a binary holding its external format (version byte first); returns
// the binary's size, as erlang:external_size/1 of the value would be.
std::size_t put_etf_binary(py::ByteBuffer& b, py::Codec& codec, PyObject* value, const py::EncodeOptions& eo) {
  const std::size_t head = b.size();
  static const std::uint8_t binary_ext[5] = {etf::kBinary, 0, 0, 0, 0};
  b.write(binary_ext, sizeof binary_ext);
  const std::size_t mark = b.size();
  b.byte(131);
  codec.encode_append(b, value, eo);
  const std::size_t n = b.size() - mark;
  if (n > 0xFFFFFFFFu) throw etf::EncodeError("a result over 4 GiB");
  std::uint8_t* p = b.data() + head + 1;
  p[0] = static_cast<std::uint8_t>(n >> 24);
  p[1] = static_cast<std::uint8_t>(n >> 16);
  p[2] = static_cast<std::uint8_t>(n >> 8);
  p[3] = static_cast<std::uint8_t>(n);
  return n;
}

void put_too_large(py::ByteBuffer& b, std::size_t size, std::size_t max) {
  etf::put_tuple_header(b, 3);
  etf::put_atom(b, "message_too_large");
  etf::put_integer(b, static_cast<std::int64_t>(size));
  etf::put_integer(b, static_cast<std::int64_t>(max));
}

}  // namespace

thread_local JobRunner::Running* JobRunner::current_run_ = nullptr;

JobRunner::JobRunner(Options o, py::Codec& codec, py::Runner& runner, PyObject* resolver, ProcessTable& procs,
                     Spawn spawn, Wake wake)
    : opt_(o), codec_(codec), runner_(runner), resolver_(PyRef::borrow(resolver)), procs_(procs),
      spawn_(std::move(spawn)), wake_(std::move(wake)) {}

JobRunner::~JobRunner() = default;

// --- accepting requests ---------------------------------------------------------------------

std::optional<JobRunner::Job> JobRunner::accept(Connection& c, const etf::Tuple& ctl, etf::Bytes payload,
                                                Bytes* owner) {
  const auto& it = ctl.items;
  Job j;
  j.req = enc(it[1]);
  j.from = enc(it[2]);
  const auto* mfa = std::get_if<etf::Tuple>(&it[4].v);
  spawn_opts(it[5], j.monitor, j.link);
  try {
    if (!mfa || mfa->items.size() != 3 || !atom_of(mfa->items[0]) || !atom_of(mfa->items[1])) {
      throw WireError("bad MFA");
    }
    const std::string& m = *atom_of(mfa->items[0]);
    const std::string& f = *atom_of(mfa->items[1]);
    const std::int64_t arity = int_of(mfa->items[2]);
    etf::Reader r(payload);
    if (r.peek_u8() == 131) r.u8();
    // The job must own its arguments: a new reader may reuse the read buffer while it
    // runs. Large ones are not copied: the job takes the buffer that holds them.
    auto args_from = [&](etf::Bytes span) {
      const std::uint8_t* rb = c.rbuf.get();
      if (span.size() >= 64 * 1024 && owner) {
        j.args_owner = std::move(*owner);
        j.args = span;
      } else if (span.size() >= 64 * 1024 && rb && span.data() >= rb &&
                 span.data() + span.size() <= rb + c.rend && c.rpos == c.rend) {
        j.args_rbuf = std::move(c.rbuf);
        c.rcap = c.rpos = c.rend = 0;
        j.args = span;
      } else {
        j.args_copy.assign(span.begin(), span.end());
        j.args = j.args_copy;
      }
    };
    if (m == "erpc" && ((f == "execute_call" && arity == 4) || (f == "execute_cast" && arity == 3))) {
      if (r.u8("argument list") != etf::kList || r.u32("list length") != static_cast<std::uint32_t>(arity)) {
        throw WireError("bad argument list");
      }
      if (arity == 4) {
        j.kind = Job::kCall;
        etf::Bytes res = skip_term(r);
        j.res.assign(res.begin(), res.end());
      } else {
        j.kind = Job::kCast;
      }
      j.module = read_atom(r);
      j.function = read_atom(r);
      args_from(skip_term(r));
    } else {
      j.kind = Job::kApply;
      j.module = m;
      j.function = f;
      args_from(payload.subspan(r.pos()));
    }
  } catch (const std::exception&) {
    py::ByteBuffer b;
    Frame fr(b);
    etf::put_tuple_header(b, 5);
    etf::put_integer(b, kSpawnReply);
    etf::put_raw(b, j.req);
    etf::put_raw(b, j.from);
    etf::put_integer(b, 0);
    etf::put_atom(b, "badarg");
    fr.end();
    c.send(b);
    return std::nullopt;
  }
  calls.fetch_add(1, std::memory_order_relaxed);
  return j;
}

void JobRunner::end_spawn(Connection& c, const Bytes& req, const Bytes& from, bool monitor, bool link,
                          const Bytes& reason) {
  const Bytes pid = procs_.encode_pid(procs_.next_id());
  py::ByteBuffer b;
  {
    Frame f(b);
    etf::put_tuple_header(b, 5);
    etf::put_integer(b, kSpawnReply);
    etf::put_raw(b, req);
    etf::put_raw(b, from);
    etf::put_integer(b, (link ? 1 : 0) | (monitor ? 2 : 0));
    etf::put_raw(b, pid);
    f.end();
  }
  if (monitor) {
    py::ByteBuffer e = exit_frame(kPayloadMonitorPExit, pid, from, &req, reason);
    b.write(e.data(), e.size());
  }
  if (link) {
    py::ByteBuffer e = exit_frame(kPayloadExit, pid, from, nullptr, reason);
    b.write(e.data(), e.size());
  }
  c.send(b);
}

void JobRunner::answer_refused(Connection& c, const Incoming& in, const Bytes& why) {
  // The call's process ends at once with the reason, inside erpc's result tuple when the
  // start of the payload holds it ({Res, error, Why, []}: erpc raises it as an error).
  try {
    etf::Reader r(in.data);
    if (r.peek_u8() == 131) r.u8();
    etf::TermBuilder tb;
    etf::DecodeOptions o;
    o.atom_cache = in.atoms;
    etf::Term ctl_term = etf::decode_term(r, tb, o);
    const auto* ctl = std::get_if<etf::Tuple>(&ctl_term.v);
    if (!ctl || ctl->items.size() < 6) return;
    const auto& it = ctl->items;
    const std::int64_t op = int_of(it[0]);
    if (op != kSpawnRequest && op != kSpawnRequestTT) return;
    bool monitor = false, link = false;
    spawn_opts(it[5], monitor, link);
    Bytes reason = why;
    const auto* mfa = std::get_if<etf::Tuple>(&it[4].v);
    if (mfa && mfa->items.size() == 3 && atom_of(mfa->items[0]) && *atom_of(mfa->items[0]) == "erpc" &&
        atom_of(mfa->items[1]) && *atom_of(mfa->items[1]) == "execute_call") {
      try {
        if (r.peek_u8() == 131) r.u8();
        if (r.u8("argument list") != etf::kList) throw WireError("bad argument list");
        r.u32("list length");
        etf::TermBuilder rb;
        const Bytes res = enc(etf::decode_term(r, rb));
        reason = build([&](auto& s) {
          etf::put_tuple_header(s, 4);
          etf::put_raw(s, res);
          etf::put_atom(s, "error");
          etf::put_raw(s, why);
          etf::put_nil(s);
        });
      } catch (const std::exception&) {
        // Not there: the plain reason.
      }
    }
    end_spawn(c, enc(it[1]), enc(it[2]), monitor, link, reason);
  } catch (const std::exception&) {
    // Its start holds no whole control message: nothing to answer.
  }
}

// --- worker threads ------------------------------------------------------------------------

bool JobRunner::start_worker(std::unique_lock<std::mutex>& lk) {
  ++workers_;
  lk.unlock();
  const bool started = spawn_([this] { worker(); });
  lk.lock();
  if (!started) --workers_;
  return started;
}

bool JobRunner::dispatch(const std::shared_ptr<Connection>& c, Job& j, bool must) {
  std::unique_lock lk(jobs_mu_);
  if (stopping_) return false;
  if (idle_workers_ <= static_cast<int>(jobs_.size())) {
    // Calls waiting in a mailbox hold their threads without running: they do not count.
    const bool started = workers_ < opt_.workers + waiting_ && start_worker(lk);
    // Without a worker of its own a job that must not run here waits for the next free one.
    if (!started && (!must || stopping_)) return false;
  }
  jobs_.push_back(Queued{c, std::make_unique<Job>(std::move(j))});
  lk.unlock();
  jobs_cv_.notify_one();
  return true;
}

void JobRunner::waiting(int delta) {
  std::unique_lock lk(jobs_mu_);
  waiting_ += delta;
  if (delta > 0 && !stopping_ && idle_workers_ < static_cast<int>(jobs_.size()) &&
      workers_ < opt_.workers + waiting_) {
    start_worker(lk);
  }
}

void JobRunner::worker() {
  std::unique_lock lk(jobs_mu_);
  for (;;) {
    ++idle_workers_;
    jobs_cv_.wait(lk, [&] { return !jobs_.empty() || stopping_; });
    --idle_workers_;
    if (stopping_) return;
    Queued q = std::move(jobs_.front());
    jobs_.pop_front();
    lk.unlock();
    run(q.conn, *q.job);
    q.job.reset();  // drop the arguments before sleeping
    q.conn.reset();
    lk.lock();
  }
}

void JobRunner::stop() {
  std::deque<Queued> left;
  {
    std::lock_guard lk(jobs_mu_);
    stopping_ = true;
    left.swap(jobs_);
  }
  jobs_cv_.notify_all();
}

void JobRunner::interrupt_all() {
  std::vector<std::shared_ptr<Running>> rs;
  {
    std::lock_guard lk(run_mu_);
    for (auto& [_, r] : running_) rs.push_back(r);
  }
  if (rs.empty() || !Py_IsInitialized()) return;
  GilHold gil;
  const unsigned long self = PyThread_get_thread_ident();  // a call that stops its own node
  for (auto& r : rs) {
    if (!r->py_done && r->tid && r->tid != self) py::interrupt_thread(r->tid);
  }
}

// --- running --------------------------------------------------------------------------------

PyRef JobRunner::resolve(const std::string& module, const std::string& function) {
  std::string key;
  key.reserve(module.size() + function.size() + 1);
  key += module;
  key += '\0';
  key += function;
  auto it = fn_cache_.find(key);
  if (it != fn_cache_.end()) return PyRef::borrow(it->second.get());
  PyRef m = PyRef::check(PyUnicode_FromStringAndSize(module.data(), static_cast<Py_ssize_t>(module.size())));
  PyRef f = PyRef::check(PyUnicode_FromStringAndSize(function.data(), static_cast<Py_ssize_t>(function.size())));
  PyRef fn = PyRef::check(PyObject_CallFunctionObjArgs(resolver_.get(), m.get(), f.get(), nullptr));
  // The resolver ran Python: another thread may have changed the cache meanwhile.
  if (fn_cache_.size() > 4096) fn_cache_.clear();
  fn_cache_.insert_or_assign(std::move(key), PyRef::borrow(fn.get()));
  return fn;
}

bool JobRunner::watched_by(const Bytes& pid) {
  const Running* r = current_run_;
  return r && (r->monitor || r->link) && r->from == pid;
}

void JobRunner::set_result_limit(std::size_t max, bool binary) {
  t_result_limit = max;
  t_result_binary = binary;
}

void JobRunner::put_error(py::ByteBuffer& reason, const Job& j, std::size_t base) {
  reason.truncate(base);
  PyRef map;
  try {
    map = runner_.error_from_exception();
  } catch (...) {
    PyErr_Clear();
  }
  py::EncodeOptions eo;
  if (j.kind == Job::kCall) {
    etf::put_tuple_header(reason, 4);
    etf::put_raw(reason, j.res);
    etf::put_atom(reason, "error");
  } else {
    etf::put_tuple_header(reason, 2);
  }
  const std::size_t mark = reason.size();
  try {
    if (!map) throw PythonError();
    if (t_result_binary && j.kind == Job::kCall) {
      // The error map too: its message and traceback are Python's to choose.
      const std::size_t size = put_etf_binary(reason, codec_, map.get(), eo);
      if (t_result_limit && size > t_result_limit) {
        reason.truncate(mark);
        put_too_large(reason, size, t_result_limit);
      }
    } else {
      codec_.encode_append(reason, map.get(), eo);
    }
  } catch (...) {
    PyErr_Clear();
    reason.truncate(mark);
    etf::put_atom(reason, "python_error");
  }
  etf::put_nil(reason);
}

void JobRunner::run(const std::shared_ptr<Connection>& conn, Job& j) {
  const std::uint32_t id = procs_.next_id();
  const Bytes pid = procs_.encode_pid(id);
  thread_local py::ByteBuffer head, reason;
  head.clear();
  reason.clear();
  {
    Frame f(head);
    etf::put_tuple_header(head, 5);
    etf::put_integer(head, kSpawnReply);
    etf::put_raw(head, j.req);
    etf::put_raw(head, j.from);
    etf::put_integer(head, (j.link ? 1 : 0) | (j.monitor ? 2 : 0));
    etf::put_raw(head, pid);
    f.end();
  }
  const bool wanted = j.monitor || j.link;
  auto run = std::make_shared<Running>();
  run->runner = this;
  run->conn = conn;
  run->reply.assign(head.data(), head.data() + head.size());
  run->req = j.req;
  run->from = j.from;
  run->monitor = j.monitor;
  run->link = j.link;
  run->started = now_ns();
  {
    std::lock_guard lk(run_mu_);
    running_.emplace(id, run);
    if (!cancelled_reqs_.empty() &&
        std::find(cancelled_reqs_.begin(), cancelled_reqs_.end(), j.req) != cancelled_reqs_.end()) {
      run->cancelled.store(true);  // cancelled while it waited for a worker
    }
  }
  wake_(false);
  {
    ensure_thread_state();
    GilHold gil;
    run->tid = PyThread_get_thread_ident();
    t_result_limit = 0;
    t_result_binary = false;
    current_run_ = run.get();
    const std::size_t base = kPayloadMagic ? 1 : 0;
    if (kPayloadMagic) reason.byte(131);
    py::EncodeOptions eo;
    py::DecodeOptions dopt;
    // Python is done with the call: no interrupt may reach this thread after it (one
    // sent but not yet raised is withdrawn).
    auto py_done = [&] {
      if (run->py_done) return;
      run->py_done = true;
      PyObject *t, *v, *tb;
      PyErr_Fetch(&t, &v, &tb);
      PyThreadState_SetAsyncExc(run->tid, nullptr);
      PyErr_Restore(t, v, tb);
    };
    // Owned for the whole call: clear_cache() on another thread (while this one runs
    // Python) must not free it under us.
    PyRef fn;
    try {
      PyRef args;
      try {
        fn = resolve(j.module, j.function);
        etf::Reader ar(j.args);
        args = codec_.decode_term(ar, dopt);
        if (!PyList_Check(args.get())) throw WireError("arguments are not a list");
      } catch (...) {
        py_done();
        throw;
      }
      PyObject* raw = PyObject_Vectorcall(fn.get(), &PyList_GET_ITEM(args.get(), 0),
                                          static_cast<std::size_t>(PyList_GET_SIZE(args.get())), nullptr);
      py_done();
      PyRef result = PyRef::check(raw);
      if (wanted) {
        if (j.kind == Job::kCall) {
          etf::put_tuple_header(reason, 3);
          etf::put_raw(reason, j.res);
          etf::put_atom(reason, "return");
          std::size_t size;
          if (t_result_binary) {
            size = put_etf_binary(reason, codec_, result.get(), eo);
          } else {
            const std::size_t mark = reason.size();
            codec_.encode_append(reason, result.get(), eo);
            size = reason.size() - mark + 1;  // as erlang:external_size/1
          }
          if (t_result_limit && size > t_result_limit) {
            reason.truncate(base);
            etf::put_tuple_header(reason, 4);
            etf::put_raw(reason, j.res);
            etf::put_atom(reason, "error");
            put_too_large(reason, size, t_result_limit);
            etf::put_nil(reason);
          }
        } else {
          etf::put_atom(reason, "normal");
        }
      }
    } catch (...) {
      py::set_python_error(codec_.types());
      put_error(reason, j, base);
    }
    t_result_limit = 0;
    t_result_binary = false;
    current_run_ = nullptr;
  }
  bool replied;
  {
    std::lock_guard rl(run->mu);
    run->finished = true;  // from here the watchdog sends nothing for it
    replied = run->replied.load();
    if (run->cancelled.load() && !run->cancel_reason.empty()) {
      // Killed by an exit signal: the process ends with its reason, as an Erlang one would.
      reason.clear();
      if (kPayloadMagic) reason.byte(131);
      reason.write(run->cancel_reason.data(), run->cancel_reason.size());
    }
  }
  // SPAWN_REPLY (unless the watchdog queued it: then it is ahead of these in the
  // connection's queue), then the exit: 'DOWN' to the monitor and/or the exit signal to
  // the link, in one write. No lock is held: the write may wait for nobody.
  iovec iov[5];
  int n = 0;
  const std::size_t skip = replied ? head.size() : 0;
  const std::size_t cut = head.size();
  if (j.monitor) {
    Frame f(head);
    etf::put_tuple_header(head, 4);
    etf::put_integer(head, kPayloadMonitorPExit);
    etf::put_raw(head, pid);
    etf::put_raw(head, j.from);
    etf::put_raw(head, j.req);
    f.end(reason.size());
  }
  const std::size_t cut2 = head.size();
  if (j.link) {
    Frame f(head);
    etf::put_tuple_header(head, 3);
    etf::put_integer(head, kPayloadExit);
    etf::put_raw(head, pid);
    etf::put_raw(head, j.from);
    f.end(reason.size());
  }
  // `reason` is each exit frame's payload.
  const std::size_t first = j.monitor ? cut2 : cut;
  if (first > skip) iov[n++] = {head.data() + skip, first - skip};
  if (j.monitor) iov[n++] = {reason.data(), reason.size()};
  if (j.link) {
    iov[n++] = {head.data() + cut2, head.size() - cut2};
    iov[n++] = {reason.data(), reason.size()};
  }
  if (n > 0) conn->sendv(iov, n);
  {
    std::lock_guard lk(run_mu_);
    running_.erase(id);
  }
  if (reason.capacity() > (std::size_t{4} << 20)) reason.release_memory();
  if (head.capacity() > (std::size_t{1} << 20)) head.release_memory();
}

// --- cancelling -----------------------------------------------------------------------------

bool JobRunner::cancel(std::uint32_t id, const Bytes* ref, const Bytes* reason) {
  std::shared_ptr<Running> r;
  std::shared_ptr<Process> waiting;
  {
    std::lock_guard lk(run_mu_);
    auto it = running_.find(id);
    if (it == running_.end()) return false;
    r = it->second;
  }
  {
    std::lock_guard lk(r->mu);
    if (r->finished) return true;
    // The caller's monitor going away means nobody waits. (Its node may name it by the
    // request id, or, for a request it abandoned before our reply, by a new reference:
    // no one else can monitor a call, MONITOR_P on it answers noproc.)
    if (ref && !r->monitor) return true;
    if (reason) r->cancel_reason = *reason;
    r->cancelled.store(true);
    waiting = r->waiting;
  }
  if (waiting) {
    // Its thread waits in a mailbox (a callback into Erlang): wake it to see the cancel.
    {
      std::lock_guard pl(waiting->mu);
      waiting->wake_locked();
    }
    waiting->notify();
  }
  wake_(true);  // the watchdog interrupts it (and again until it stops)
  return true;
}

void JobRunner::cancel_request(const Bytes& req) {
  std::uint32_t id = 0;
  {
    std::lock_guard lk(run_mu_);
    for (auto& [i, r] : running_) {
      if (r->req == req) id = i;
    }
    if (!id) {
      // Not running (yet, or any more): remember it a while for a job still queued.
      cancelled_reqs_.push_back(req);
      if (cancelled_reqs_.size() > 64) cancelled_reqs_.pop_front();
      return;
    }
  }
  cancel(id, nullptr, nullptr);
}

void JobRunner::connection_down(const Connection* c) {
  const Bytes noconn = enc_atom("noconnection");
  std::vector<std::uint32_t> ids;
  {
    std::lock_guard lk(run_mu_);
    for (auto& [id, r] : running_) {
      if (r->conn.get() == c && (r->monitor || r->link)) ids.push_back(id);
    }
  }
  for (std::uint32_t id : ids) cancel(id, nullptr, &noconn);
}

bool JobRunner::tend(std::int64_t now) {
  const std::int64_t slow = static_cast<std::int64_t>(opt_.slow_ms) * 1'000'000;
  std::vector<std::shared_ptr<Running>> rs;
  bool attention = false;
  {
    std::lock_guard lk(run_mu_);
    for (auto& [_, r] : running_) {
      if (r->cancelled.load() || !r->replied.load()) {
        rs.push_back(r);
        attention = true;
      }
    }
  }
  std::vector<std::shared_ptr<Running>> kill;
  for (auto& r : rs) {
    if (r->cancelled.load()) {
      kill.push_back(r);
      continue;
    }
    if (now - r->started < slow) continue;
    bool mine;
    {
      // Queued under the call's lock, written after it: the reply keeps its place before
      // the call's exit, and a peer that does not read holds up nobody here.
      std::lock_guard lk(r->mu);
      if (r->finished || r->replied.load()) continue;
      r->replied.store(true);
      mine = r->conn->queue(r->reply.data(), r->reply.size());
    }
    if (mine) r->conn->drain();
  }
  if (!kill.empty()) {
    // Before 3.12 one thread taking its async exception can clear the signal for the
    // others, so a cancelled call gets its KeyboardInterrupt on every round until it stops.
    ensure_thread_state();
    GilHold gil;
    for (auto& r : kill) {
      if (!r->py_done && r->tid) py::interrupt_thread(r->tid);
    }
  }
  return attention;
}

// --- waiting in a mailbox ------------------------------------------------------------------

JobRunner::WaitScope::WaitScope(const std::shared_ptr<Process>& p) {
  if (Running* r = current_run_) {
    {
      std::lock_guard lk(r->mu);
      r->waiting = p;
    }
    runner_ = r->runner;
    runner_->waiting(1);
  }
}

JobRunner::WaitScope::~WaitScope() {
  if (Running* r = current_run_) {
    std::lock_guard lk(r->mu);
    r->waiting.reset();
  }
  if (runner_) runner_->waiting(-1);
}

bool JobRunner::WaitScope::cancelled() const {
  const Running* r = current_run_;
  return r && r->cancelled.load();
}

}  // namespace erpy::node
