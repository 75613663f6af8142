# bench/peers/elixir_peer.exs -- Elixir's processes on bench/peers.lua's workloads.
#
#   elixir bench/peers/elixir_peer.exs WORKLOAD
#
# WORKLOAD: tasks, sleep, timers or dag, as in bench/peers.lua (the same
# sizes; the DAG from the same generator).  Prints one JSON object:
# {"cold": ..., "warm": ...} (and "define_cold", "define_warm" for dag): the
# first run in this VM, and the best of the next @warm runs; microseconds per
# unit, or seconds for all of the timers.  No "threads": a BEAM process is
# already scheduled on every core; tasks are the comparison there.
defmodule Peer do
  @tasks_n 200_000
  @sleep_n 100_000
  @dag_n 10_000
  @timer_n 1_000_000
  @warm 2

  defp us_per(n, fun) do
    {us, _} = :timer.tc(fun)
    us / n
  end

  # Task.async / Task.await: a process per task, its result sent back.
  def tasks do
    us_per(@tasks_n, fn ->
      ts = for _ <- 1..@tasks_n, do: Task.async(fn -> 1 end)
      Enum.each(ts, &Task.await(&1, :infinity))
    end)
  end

  def sleep do
    us_per(@sleep_n, fn ->
      ts = for _ <- 1..@sleep_n, do: Task.async(fn -> Process.sleep(1) end)
      Enum.each(ts, &Task.await(&1, :infinity))
    end)
  end

  # Process.send_after with the generator of bench/peers.lua; seconds for
  # all.  Each run in a process of its own whose mailbox is off its heap (a
  # million messages on the heap of one process made each later run slower:
  # 9.8 s, then 35 s).
  def timers do
    me = self()

    spawn(fn ->
      Process.flag(:message_queue_data, :off_heap)
      send(me, {:timers, timers_here()})
    end)

    receive do
      {:timers, s} -> s
    end
  end

  defp timers_here do
    {us, _} =
      :timer.tc(fn ->
        Enum.reduce(1..@timer_n, 1, fn _, seed ->
          seed = rem(seed * 1_103_515_245 + 12345, 2_147_483_648)
          Process.send_after(self(), :fired, trunc(seed / 2_147_483_648 * 100))
          seed
        end)

        receive_n(:fired, @timer_n)
      end)

    us / 1.0e6
  end

  # Waits for n messages `msg`.
  defp receive_n(_msg, 0), do: :ok

  defp receive_n(msg, n) do
    receive do
      ^msg -> receive_n(msg, n - 1)
    end
  end

  # The DAG of bench/peers.lua and dag.js: layers of 100, each node after 1-3
  # random nodes of the layer before (the same generator, so the same graph).
  def dag_define do
    width = 100

    {nodes, _} =
      Enum.reduce(0..(div(@dag_n, width) - 1), {[], 3}, fn layer, {acc, seed} ->
        Enum.reduce(0..(width - 1), {acc, seed}, fn _, {acc, seed} ->
          {deps, seed} =
            if layer > 0 do
              {seed, k} = random(seed, 3)

              Enum.reduce(1..k, {[], seed}, fn _, {deps, seed} ->
                {seed, r} = random(seed, width)
                {[(layer - 1) * width + r - 1 | deps], seed}
              end)
            else
              {[], seed}
            end

          {[{deps, fn -> 1 end} | acc], seed}
        end)
      end)

    nodes |> Enum.reverse() |> List.to_tuple()
  end

  defp random(seed, k) do
    seed = rem(seed * 1_103_515_245 + 12345, 2_147_483_648)
    {seed, 1 + rem(seed, k)}
  end

  # A process per node: it waits for a message from each dependency, runs
  # its step, and tells its dependents and the caller.
  def dag_run(nodes) do
    n = tuple_size(nodes)

    dependents =
      Enum.reduce(0..(n - 1), %{}, fn i, acc ->
        {deps, _} = elem(nodes, i)
        Enum.reduce(deps, acc, fn d, acc -> Map.update(acc, d, [i], &[i | &1]) end)
      end)

    me = self()

    pids =
      for i <- 0..(n - 1) do
        {deps, run} = elem(nodes, i)
        spawn(fn -> node(length(deps), run, me) end)
      end
      |> List.to_tuple()

    for i <- 0..(n - 1), do: send(elem(pids, i), {:targets, Enum.map(Map.get(dependents, i, []), &elem(pids, &1))})
    receive_n(:node_done, n)
  end

  defp node(waiting, run, parent) do
    targets =
      receive do
        {:targets, t} -> t
      end

    receive_n(:dep_done, waiting)
    run.()
    Enum.each(targets, &send(&1, :dep_done))
    send(parent, :node_done)
  end

  def dag do
    {define_us, nodes} = :timer.tc(fn -> dag_define() end)
    {run_us, _} = :timer.tc(fn -> dag_run(nodes) end)
    {run_us / @dag_n, define_us / @dag_n}
  end

  def main([workload]) do
    fun = String.to_existing_atom(workload)
    [cold | warm] = for _ <- 0..@warm, do: apply(Peer, fun, [])

    fields =
      if fun == :dag do
        [
          {"cold", elem(cold, 0)},
          {"warm", warm |> Enum.map(&elem(&1, 0)) |> Enum.min()},
          {"define_cold", elem(cold, 1)},
          {"define_warm", warm |> Enum.map(&elem(&1, 1)) |> Enum.min()}
        ]
      else
        [{"cold", cold}, {"warm", Enum.min(warm)}]
      end

    body = Enum.map_join(fields, ",", fn {k, v} -> "\"#{k}\":#{:erlang.float_to_binary(v / 1, decimals: 6)}" end)
    IO.puts("{" <> body <> "}")
  end
end

Peer.main(System.argv())
