// Adaptive waiting (common/spin_wait.hpp): when the policy lets a waiter spin, how failed
// spins back it off to blocking, how it comes back, and how a spin loop tells an event,
// a timeout and a lost CPU apart.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "common/spin_wait.hpp"

namespace {

using erpy::SpinPolicy;
using Outcome = SpinPolicy::Outcome;

constexpr std::int64_t kMax = 50000;

// Budgets of the next `n` waits: how many of them spin.
int spins_in(SpinPolicy& p, int n) {
  int spun = 0;
  for (int i = 0; i < n; ++i) spun += p.budget_ns() > 0;
  return spun;
}

TEST(SpinPolicy, OffWhenMaxIsZero) {
  SpinPolicy p(0);
  EXPECT_EQ(p.budget_ns(), 0);
  p.record(Outcome::found);
  EXPECT_EQ(p.budget_ns(), 0);
}

TEST(SpinPolicy, KeepsSpinningWhileSpinsFindTheEvent) {
  SpinPolicy p(kMax);
  for (int i = 0; i < 100; ++i) {
    ASSERT_EQ(p.budget_ns(), kMax);
    p.record(Outcome::found);
  }
}

TEST(SpinPolicy, FailedSpinsBackOffExponentiallyThenProbe) {
  SpinPolicy p(kMax);
  ASSERT_EQ(p.budget_ns(), kMax);
  p.record(Outcome::timed_out);  // penalty 1: one wait blocks, the next probes
  EXPECT_EQ(p.budget_ns(), 0);
  EXPECT_EQ(p.budget_ns(), kMax);
  p.record(Outcome::timed_out);  // penalty 3
  EXPECT_EQ(spins_in(p, 3), 0);
  EXPECT_EQ(p.budget_ns(), kMax);
  for (int i = 0; i < 20; ++i) p.record(Outcome::preempted);
  EXPECT_EQ(p.penalty(), SpinPolicy::kMaxPenalty);  // bounded
  EXPECT_EQ(spins_in(p, SpinPolicy::kMaxPenalty), 0);
  EXPECT_EQ(p.budget_ns(), kMax);
}

TEST(SpinPolicy, TimeoutBackoffHalvesOnSuccessPreemptionBackoffStepsDown) {
  SpinPolicy t(kMax);
  for (int i = 0; i < 5; ++i) t.record(Outcome::timed_out);
  const int before = t.penalty();
  t.record(Outcome::found);
  EXPECT_EQ(t.penalty(), before / 2);

  SpinPolicy c(kMax);
  for (int i = 0; i < 5; ++i) c.record(Outcome::preempted);
  const int high = c.penalty();
  c.record(Outcome::found);
  EXPECT_EQ(c.penalty(), high - 1);  // a contended core stays suspect for a while
  for (int i = 0; i < high; ++i) c.record(Outcome::found);
  EXPECT_EQ(c.penalty(), 0);
  c.record(Outcome::timed_out);  // contention is forgotten once the penalty is gone
  c.record(Outcome::found);
  EXPECT_EQ(c.penalty(), 0);
}

TEST(SpinPolicy, ShortBlockedWaitsUndoATimeoutBackoffOnly) {
  SpinPolicy t(kMax);
  for (int i = 0; i < 6; ++i) t.record(Outcome::timed_out);
  const int high = t.penalty();
  t.record_blocked(kMax * 10);  // slower than a spin: no evidence
  EXPECT_EQ(t.penalty(), high);
  t.record_blocked(kMax / 2);  // a spin would have found it
  EXPECT_EQ(t.penalty(), high / 2);
  EXPECT_LE(t.skip(), t.penalty());

  SpinPolicy c(kMax);
  for (int i = 0; i < 6; ++i) c.record(Outcome::preempted);
  const int contended = c.penalty();
  c.record_blocked(kMax / 2);  // blocking is what a contended core wants
  EXPECT_EQ(c.penalty(), contended);
}

TEST(SpinWait, FindsAnEventThatComes) {
  std::atomic<bool> flag{false};
  std::thread setter([&] {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    flag = true;
  });
  // A long budget: the event comes first (or the spin loses its CPU on a busy machine,
  // and the last check still finds the flag once it is set).
  Outcome o;
  do {
    o = erpy::spin_for(
        std::int64_t{10} * 1000 * 1000 * 1000, 64, [&] { return flag.load(); }, [] { erpy::cpu_relax(); }, [] {});
  } while (o != Outcome::found);
  setter.join();
  EXPECT_TRUE(flag.load());
}

TEST(SpinWait, GivesUpWhenNothingComes) {
  const Outcome o = erpy::spin_for(20000, 64, [] { return false; }, [] { erpy::cpu_relax(); }, [] {});
  EXPECT_TRUE(o == Outcome::timed_out || o == Outcome::preempted);
}

TEST(SpinWait, ALostCpuEndsTheSpinAsPreempted) {
  // A pause that sleeps stands for a spinner the kernel took off its CPU.
  std::int64_t lost = 0;
  const Outcome o = erpy::spin_for(
      std::int64_t{10} * 1000 * 1000 * 1000, 1, [] { return false; },
      [] { std::this_thread::sleep_for(std::chrono::milliseconds(30)); }, [] {}, &lost);
  EXPECT_EQ(o, Outcome::preempted);
  EXPECT_GT(lost, SpinPolicy::kWakeNs);
}

TEST(SpinWait, VerdictWeighsTheTimeLost) {
  // Found after a short loss (the awaited thread ran in our place): spinning paid.
  EXPECT_EQ(SpinPolicy::verdict(Outcome::found, SpinPolicy::kGapNs * 2), Outcome::found);
  EXPECT_EQ(SpinPolicy::verdict(Outcome::found, 0), Outcome::found);
  // Lost more than a wake-up costs: blocking would have done as well, found or not.
  EXPECT_EQ(SpinPolicy::verdict(Outcome::found, SpinPolicy::kWakeNs + 1), Outcome::preempted);
  EXPECT_EQ(SpinPolicy::verdict(Outcome::timed_out, SpinPolicy::kWakeNs + 1), Outcome::preempted);
  // Not found, and the core was shared: contended.
  EXPECT_EQ(SpinPolicy::verdict(Outcome::timed_out, SpinPolicy::kGapNs + 1), Outcome::preempted);
  EXPECT_EQ(SpinPolicy::verdict(Outcome::timed_out, 0), Outcome::timed_out);
}

TEST(SpinWait, AShortLossThenTheEventIsFound) {
  // One gap shorter than a wake-up, then the event: found, and the loss is told.
  int polls = 0;
  std::int64_t lost = 0;
  const Outcome o = erpy::spin_for(
      std::int64_t{10} * 1000 * 1000 * 1000, 1, [&] { return polls >= 2; },
      [&] {
        if (++polls == 1) std::this_thread::sleep_for(std::chrono::microseconds(30));
      },
      [] {}, &lost);
  EXPECT_GT(lost, SpinPolicy::kGapNs);
  // (A loaded machine may oversleep past a wake-up's cost: then the spin gave up.)
  if (lost <= SpinPolicy::kWakeNs) {
    EXPECT_EQ(o, Outcome::found);
    EXPECT_EQ(SpinPolicy::verdict(o, lost), Outcome::found);
  } else {
    EXPECT_EQ(o, Outcome::preempted);
  }
}

TEST(SpinWait, AdaptiveSpinRecordsAndSkips) {
  SpinPolicy p(kMax);
  EXPECT_EQ(erpy::adaptive_spin(p, 64, [] { return true; }, [] {}, [] {}), erpy::Spun::found);
  EXPECT_EQ(p.penalty(), 0);
  const erpy::Spun s = erpy::adaptive_spin(p, 64, [] { return false; }, [] { erpy::cpu_relax(); }, [] {});
  EXPECT_EQ(s, erpy::Spun::gave_up);
  EXPECT_EQ(p.penalty(), 1);
  EXPECT_EQ(erpy::adaptive_spin(p, 64, [] { return true; }, [] {}, [] {}), erpy::Spun::skipped);
}

}  // namespace
