from ghostvis_jax.eval.run import main

if __name__ == "__main__":
    main()
